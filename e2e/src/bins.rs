//! Workspace binaries for end-to-end runs. Cargo builds a test's own package's binaries only, so
//! the others are built here once per process, in the profile the test itself was built in.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

static BUILT: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn target_dir() -> PathBuf {
    // <target>/<profile>/deps/<test-exe> or <target>/<profile>/<bin>
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// The path of binary `name` of package `package`, built if this process has not yet done so.
pub fn path(package: &str, name: &str) -> PathBuf {
    let dir = target_dir();
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if !built.iter().any(|b| b == name) {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut command = Command::new(cargo);
        command.args(["build", "--quiet", "-p", package, "--bin", name]);
        // Cargo gives a test process its own package's variables; passed on, they would make
        // build scripts that watch them rebuild everything, alternating with a build by hand.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            let set_for_test = [
                "CARGO_PKG_",
                "CARGO_MANIFEST_",
                "CARGO_CRATE_",
                "CARGO_BIN_",
            ]
            .iter()
            .any(|p| key.starts_with(p))
                || [
                    "CARGO_PRIMARY_PACKAGE",
                    "CARGO_TARGET_TMPDIR",
                    "CARGO_RUSTC_CURRENT_DIR",
                    "OUT_DIR",
                ]
                .contains(&key.as_ref());
            if set_for_test {
                command.env_remove(key.as_ref());
            }
        }
        if dir.ends_with("release") {
            command.arg("--release");
        }
        let status = command.status().expect("running cargo build");
        assert!(
            status.success(),
            "cargo build -p {package} --bin {name} failed"
        );
        built.push(name.to_string());
    }
    dir.join(name)
}
