//! Compiles the test service's protobuf with protox (pure Rust): no protoc on the machine.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/fanout_test.proto");
    let descriptors = protox::compile(["proto/fanout_test.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
