//! Workspace binaries for end-to-end runs. Cargo builds a test's own package's binaries only, so
//! the others are built here once per process, in the profile the test itself was built in.
//!
//! The build asks for what `make test` (and `cargo nextest run --workspace`) already built, with
//! the same feature set: debug binaries beside the workspace's tests, release binaries as `make
//! bench` and `make demo` build them. A build of one package alone would resolve its
//! dependencies' features differently and compile them all again, minutes on a CI runner.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

static BUILT: Mutex<bool> = Mutex::new(false);

fn target_dir() -> PathBuf {
    // <target>/<profile>/deps/<test-exe> or <target>/<profile>/<bin>
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// The path of binary `name` of package `package`, built (with every workspace binary) if this
/// process has not yet done so.
pub fn path(package: &str, name: &str) -> PathBuf {
    let dir = target_dir();
    let release = dir.ends_with("release");
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if !*built {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut command = Command::new(cargo);
        command.args(["build", "--quiet", "--workspace", "--bins"]);
        if release {
            command.arg("--release");
        } else {
            // With the tests, so that dev-dependencies' features count as they do in a test run.
            command.arg("--tests");
        }
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
        let status = command.status().expect("running cargo build");
        assert!(
            status.success(),
            "cargo build of the workspace's binaries (for {package}'s {name}) failed"
        );
        *built = true;
    }
    dir.join(name)
}
