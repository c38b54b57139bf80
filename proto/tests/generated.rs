//! The checked-in generated code must be exactly what `tonic-prost-build` makes of the `.proto`.

use std::path::Path;

#[test]
fn generated_code_is_fresh() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = tempfile::tempdir().expect("temp dir");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .emit_rerun_if_changed(false)
        .out_dir(out.path())
        .compile_protos(&[root.join("proto/ha/v1/ha.proto")], &[root.join("proto")])
        .expect("protoc must be installed (scripts/install-deps.sh) to regenerate the contract");
    let fresh = std::fs::read_to_string(out.path().join("ha.v1.rs")).expect("generated file");
    let checked_in_path = root.join("src/gen/ha.v1.rs");
    if std::env::var_os("HA_PROTO_BLESS").is_some() {
        std::fs::write(&checked_in_path, &fresh).expect("write generated code");
        return;
    }
    let checked_in = std::fs::read_to_string(&checked_in_path).unwrap_or_default();
    assert!(
        checked_in == fresh,
        "proto/src/gen/ha.v1.rs is stale: run `HA_PROTO_BLESS=1 cargo test -p ha-proto --test generated` and commit the result"
    );
}
