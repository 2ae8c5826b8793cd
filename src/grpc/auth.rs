//! Bearer-token check for the Admin service.

use tonic::{Request, Status};

use crate::error::Error;

/// An interceptor that lets a request through when no token is configured,
/// or when it carries `authorization: Bearer <token>` (the scheme in any
/// case, as RFC 7235 has it: `bearer`, `BEARER`).
#[derive(Clone)]
pub struct RequireToken {
    token: Option<String>,
}

impl RequireToken {
    pub fn new(token: Option<String>) -> Self {
        Self {
            token: token.filter(|t| !t.is_empty()),
        }
    }

    pub fn check<T>(&self, request: Request<T>) -> Result<Request<T>, Status> {
        let Some(expected) = &self.token else {
            return Ok(request);
        };
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(bearer_token)
            .unwrap_or("");
        if constant_time_eq(presented.as_bytes(), expected.as_bytes()) {
            Ok(request)
        } else {
            Err(Error::Unauthenticated.into())
        }
    }
}

/// The token of `Bearer <token>`: the scheme matched case-insensitively,
/// then one or more spaces (RFC 7235 `credentials`, RFC 6750 `b64token`).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, rest) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| rest.trim_start_matches(' '))
}

/// Compares without an early exit on the first differing byte, so the time
/// taken does not tell an attacker how much of a guess was right.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_header(value: &str) -> Request<()> {
        let mut r = Request::new(());
        r.metadata_mut()
            .insert("authorization", value.parse().unwrap());
        r
    }

    #[test]
    fn token_rules() {
        let open = RequireToken::new(None);
        assert!(open.check(Request::new(())).is_ok());
        let guarded = RequireToken::new(Some("s3cret".into()));
        assert!(guarded.check(Request::new(())).is_err());
        assert!(guarded.check(with_header("Bearer wrong!")).is_err());
        assert!(guarded.check(with_header("s3cret")).is_err());
        assert!(guarded.check(with_header("Bearer s3cret")).is_ok());
    }

    #[test]
    fn the_scheme_is_case_insensitive_and_the_token_is_not() {
        let guarded = RequireToken::new(Some("s3cret".into()));
        for accepted in ["bearer s3cret", "BEARER s3cret", "bEaReR  s3cret"] {
            assert!(guarded.check(with_header(accepted)).is_ok(), "{accepted}");
        }
        for refused in [
            "Bearer S3CRET",
            "Bearers3cret",
            "Basic s3cret",
            "Bearer",
            "Bearer ",
            "s3cret s3cret",
        ] {
            assert!(guarded.check(with_header(refused)).is_err(), "{refused}");
        }
    }
}
