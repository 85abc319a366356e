//! The AdmissionReviews recorded from a kube-apiserver v1.28.0, kept with the webhook's tests.

use std::path::{Path, PathBuf};

pub fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../webhook/tests/fixtures/admission")
}

/// `(name, body)` of every recorded review, sorted by name.
pub fn reviews() -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir())
        .expect("fixtures directory")
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            (path.extension()? == "json").then(|| {
                let name = path.file_stem().unwrap().to_string_lossy().into_owned();
                (name, std::fs::read(&path).expect("fixture readable"))
            })
        })
        .collect();
    out.sort();
    out
}
