//! The tokens: each guards its own service (the client token the Inventory
//! rpcs, the admin token the Admin ones), the bearer scheme is matched
//! case-insensitively (RFC 7235), the token itself exactly.

use stockd::pb;
use tonic::Code;

use crate::support::*;

/// A stockd with the admin token `adm1n` and the client token `cl1ent`.
async fn spawn_app_with_tokens() -> TestApp {
    spawn_app_with(Options::with_args(&[
        "--admin-token",
        "adm1n",
        "--client-token",
        "cl1ent",
    ]))
    .await
}

#[tokio::test]
async fn tokens_guard_admin_and_inventory_rpcs() {
    let app = spawn_app_with_tokens().await;
    let get = || get_request(&[("x", "")]);
    let flush_status = pb::FlushStatusRequest::default;
    let mut inv = app.inventory.clone();
    assert_eq!(code_of(app.get(&[("x", "")]).await), Code::Unauthenticated);
    assert_eq!(
        code_of(inv.get_stock(with_token("adm1n", get())).await),
        Code::Unauthenticated,
        "tokens are per service"
    );
    inv.get_stock(with_token("cl1ent", get())).await.unwrap();
    let mut admin = app.admin.clone();
    assert_eq!(
        code_of(
            admin
                .flush_status(with_token("cl1ent", flush_status()))
                .await
        ),
        Code::Unauthenticated
    );
    admin
        .flush_status(with_token("adm1n", flush_status()))
        .await
        .unwrap();
    app.stop().await;
}

#[tokio::test]
async fn bearer_scheme_in_any_case() {
    let app = spawn_app_with_tokens().await;
    let get = || get_request(&[("x", "")]);
    let (mut inventory, mut admin) = (app.inventory.clone(), app.admin.clone());
    for scheme in ["Bearer", "bearer", "BEARER"] {
        inventory
            .get_stock(with_authorization(&format!("{scheme} cl1ent"), get()))
            .await
            .unwrap_or_else(|s| panic!("{scheme}: {s:?}"));
        admin
            .flush_status(with_authorization(
                &format!("{scheme} adm1n"),
                pb::FlushStatusRequest::default(),
            ))
            .await
            .unwrap_or_else(|s| panic!("{scheme}: {s:?}"));
    }
    for refused in ["bearer CL1ENT", "Basic cl1ent", "bearercl1ent"] {
        assert_eq!(
            code_of(
                inventory
                    .get_stock(with_authorization(refused, get()))
                    .await
            ),
            Code::Unauthenticated,
            "{refused}"
        );
    }
    app.stop().await;
}
