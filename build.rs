//! Generates the gRPC code for `proto/stockd/v1/stockd.proto`.
//!
//! protoc is never a manual install step: `PROTOC` is honoured when set, and
//! otherwise the binary vendored by the `protoc-bin-vendored` crate is used.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if env::var_os("PROTOC").is_none() {
        // SAFETY: build scripts are single-threaded; nothing else reads the
        // environment concurrently.
        unsafe { env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    }
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        // Generated default bodies answer UNIMPLEMENTED, so that an rpc
        // added to the proto compiles before it is implemented (today every
        // rpc of the contract is), and Watch returns a boxed stream.
        .generate_default_stubs(true)
        .file_descriptor_set_path(out_dir.join("stockd_descriptor.bin"))
        .compile_protos(&["proto/stockd/v1/stockd.proto"], &["proto"])?;
    Ok(())
}
