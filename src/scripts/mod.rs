//! The Lua scripts that change stock, one file per operation.
//!
//! The stock-changing scripts are `prelude.lua` followed by their own file;
//! the prelude holds the shared key/argument layout and helpers, documented
//! at its top. `load.lua` and `unlock.lua` stand alone. Each
//! script's header states its KEYS, ARGV, reply and invariants. Scripts are
//! run with EVALSHA (`redis::Script` loads them on NOSCRIPT), so a request
//! costs one round trip.

use std::sync::LazyLock;

use redis::Script;

macro_rules! script {
    ($(#[$doc:meta])* $name:ident, $file:literal, standalone) => {
        $(#[$doc])*
        pub static $name: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!($file)));
    };
    ($(#[$doc:meta])* $name:ident, $file:literal) => {
        $(#[$doc])*
        pub static $name: LazyLock<Script> =
            LazyLock::new(|| Script::new(concat!(include_str!("prelude.lua"), include_str!($file))));
    };
}

script!(
    /// Hold units for a reservation.
    RESERVE,
    "reserve.lua"
);
script!(
    /// Commit, release or expire a held reservation.
    FINISH,
    "finish.lua"
);
script!(
    /// Move a held reservation's expiry.
    EXTEND,
    "extend.lua"
);
script!(
    /// Signed change of `available` (Decrement, Adjust).
    APPLY,
    "apply.lua"
);
script!(
    /// Absolute set of `available` (Admin.SetStock).
    SET,
    "set.lua"
);
script!(
    /// Restate Redis's quantities as a `set` event (reconcile repair).
    REPAIR,
    "repair.lua"
);
script!(
    /// Reservation ids whose hold has lapsed (the reaper's query).
    DUE,
    "due.lua"
);
script!(
    /// Copy items from Postgres where Redis lacks them or is older; no event.
    LOAD,
    "load.lua",
    standalone
);
script!(
    /// Release a lock held with a token.
    UNLOCK,
    "unlock.lua",
    standalone
);
