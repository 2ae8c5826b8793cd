//! Who may see what: the client token and public mode (DESIGN.md, "HTTP
//! API for storefronts").
//!
//! | token configured | `Authorization` header | public mode off | public mode on |
//! |---|---|---|---|
//! | no  | any or none            | full            | public          |
//! | yes | `Bearer <the token>`   | full            | full            |
//! | yes | anything else          | 401             | 401             |
//! | yes | none                   | 401             | public          |
//!
//! A wrong token is refused even in public mode, so that a misconfigured
//! service notices instead of silently getting less.

use axum::extract::{FromRef, FromRequestParts};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;

use super::error::ApiError;
use crate::config::Secret;
use crate::error::Error;
use crate::grpc::constant_time_eq;

/// What a request may see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    /// Quantities, versions, event details.
    Full,
    /// Only the availability bucket of each item.
    Public,
}

/// The deployment's rules, from the configuration.
#[derive(Debug, Clone)]
pub(crate) struct AccessPolicy {
    token: Option<Secret>,
    public: bool,
}

impl AccessPolicy {
    pub fn new(token: Option<Secret>, public: bool) -> Self {
        Self {
            token: token.filter(|t| !t.expose().is_empty()),
            public,
        }
    }

    /// The access of a request carrying `authorization` (the header's
    /// value, or the `Authorization` of a GraphQL WebSocket's
    /// `connection_init` payload).
    pub fn decide(&self, authorization: Option<&str>) -> Result<Access, Error> {
        let Some(expected) = &self.token else {
            return Ok(if self.public {
                Access::Public
            } else {
                Access::Full
            });
        };
        match authorization {
            None if self.public => Ok(Access::Public),
            None => Err(Error::Unauthenticated),
            Some(value) => {
                let presented = value.strip_prefix("Bearer ").unwrap_or("");
                if constant_time_eq(presented.as_bytes(), expected.expose().as_bytes()) {
                    Ok(Access::Full)
                } else {
                    Err(Error::Unauthenticated)
                }
            }
        }
    }
}

/// The `Authorization` header of a request, when it has a readable one.
pub(crate) fn authorization(parts: &Parts) -> Option<&str> {
    parts
        .headers
        .get(AUTHORIZATION)
        .map(|v| v.to_str().unwrap_or(""))
}

impl<S> FromRequestParts<S> for Access
where
    AccessPolicy: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Ok(AccessPolicy::from_ref(state).decide(authorization(parts))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_of_the_module_docs() {
        let token = || Some(Secret::new("s3cret"));
        let good = Some("Bearer s3cret");
        let bad = Some("Bearer nope");
        let open = AccessPolicy::new(None, false);
        assert_eq!(open.decide(None).unwrap(), Access::Full);
        assert_eq!(open.decide(bad).unwrap(), Access::Full);
        let open_public = AccessPolicy::new(None, true);
        assert_eq!(open_public.decide(good).unwrap(), Access::Public);
        let guarded = AccessPolicy::new(token(), false);
        assert_eq!(guarded.decide(good).unwrap(), Access::Full);
        assert!(guarded.decide(bad).is_err());
        assert!(guarded.decide(Some("s3cret")).is_err());
        assert!(guarded.decide(None).is_err());
        let public = AccessPolicy::new(token(), true);
        assert_eq!(public.decide(good).unwrap(), Access::Full);
        assert!(public.decide(bad).is_err());
        assert_eq!(public.decide(None).unwrap(), Access::Public);
        assert_eq!(
            AccessPolicy::new(Some(Secret::new("")), false)
                .decide(None)
                .unwrap(),
            Access::Full
        );
    }
}
