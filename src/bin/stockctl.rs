//! `stockctl` — command-line client of the stockd inventory server.
//!
//! Thin on purpose: the commands live in `stockd::ctl`.

use std::io;
use std::process::ExitCode;

use clap::Parser;
use stockd::ctl::{self, Cli};

fn main() -> ExitCode {
    // Usage errors exit with 2 here (clap's default).
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(ctl::EXIT_RPC_ERROR);
        }
    };
    let code = runtime.block_on(ctl::run(cli, &mut io::stdout(), &mut io::stderr()));
    ExitCode::from(code)
}
