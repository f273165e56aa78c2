//! Compiles proto/corral/v1 with tonic-prost-build and writes a descriptor
//! set for server reflection. protoc comes from protoc-bin-vendored, so a
//! fresh machine needs no system protoc.
use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if env::var_os("PROTOC").is_none() {
        // SAFETY: build scripts are single-threaded.
        unsafe { env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    }
    let out = PathBuf::from(env::var("OUT_DIR")?);
    let protos = [
        "proto/corral/v1/common.proto",
        "proto/corral/v1/workers.proto",
        "proto/corral/v1/jobs.proto",
        "proto/corral/v1/admin.proto",
    ];
    // `build_transport(false)`: the generated `connect` constructor would
    // clash with the `Workers.Connect` rpc; clients use `new(channel)`.
    tonic_prost_build::configure()
        .build_transport(false)
        // Images are shared, not copied, between the wire and the store.
        .bytes(".corral.v1.JobResult.images")
        .bytes(".corral.v1.JobOutput.images")
        .file_descriptor_set_path(out.join("corral_descriptor.bin"))
        .compile_protos(&protos, &["proto"])?;
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    Ok(())
}
