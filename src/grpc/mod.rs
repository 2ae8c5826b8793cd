//! The gRPC surface: the `Inventory` and `Admin` services, request
//! conversion, and the admin token check.

mod admin;
mod auth;
mod convert;
mod inventory;

pub use admin::AdminService;
pub use auth::RequireToken;
pub use inventory::InventoryService;
