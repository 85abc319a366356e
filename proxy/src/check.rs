//! `fanout-proxy check FILE`: the same validation the proxy does at start, one line per fault.

use std::path::Path;

use fanout_proxy_config::ProxyConfig;

/// The config in `path`, or one line per fault (the file's name first).
pub fn load(path: &Path) -> Result<ProxyConfig, Vec<String>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| vec![format!("{}: cannot read: {e}", path.display())])?;
    ProxyConfig::from_json(&text).map_err(|e| {
        e.lines()
            .into_iter()
            .map(|line| format!("{}: {line}", path.display()))
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_are_prefixed_with_the_file() {
        let dir = std::env::temp_dir().join(format!("fanout-check-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("config.json");
        std::fs::write(&file, r#"{"version":1,"upstreams":[]}"#).unwrap();
        let lines = load(&file).unwrap_err();
        assert_eq!(
            lines,
            [format!(
                "{}: upstreams: must list at least one upstream (or set grpc_health)",
                file.display()
            )]
        );
        let lines = load(&dir.join("missing.json")).unwrap_err();
        assert!(lines[0].contains("cannot read"), "{lines:?}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
