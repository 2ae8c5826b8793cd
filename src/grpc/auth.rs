//! Bearer-token check for the Admin service.

use tonic::{Request, Status};

use crate::error::Error;

/// An interceptor that lets a request through when no token is configured,
/// or when it carries `authorization: Bearer <token>`.
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
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if constant_time_eq(presented.as_bytes(), expected.as_bytes()) {
            Ok(request)
        } else {
            Err(Error::Unauthenticated.into())
        }
    }
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
}
