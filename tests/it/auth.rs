//! The bearer scheme of both tokens is matched case-insensitively (RFC
//! 7235); the token itself is compared exactly.

use tonic::Code;

use stockd::pb;

use crate::support::*;

#[tokio::test]
async fn bearer_scheme_in_any_case() {
    let app = spawn_app_with(Options::with_args(&[
        "--admin-token",
        "adm1n",
        "--client-token",
        "cl1ent",
    ]))
    .await;
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
