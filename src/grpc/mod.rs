//! The gRPC surface: the `Inventory` and `Admin` services, request
//! conversion, bearer-token checks, health, and admission (load shedding, request
//! spans and metrics).

mod admin;
mod admission;
mod auth;
mod convert;
mod decode_errors;
mod health;
mod inventory;

pub use admin::AdminService;
pub use admission::AdmissionLayer;
pub(crate) use admission::UNKNOWN_RPC;
pub use auth::RequireToken;
pub(crate) use auth::constant_time_eq;
pub use health::StoppingHealth;
pub use inventory::InventoryService;
