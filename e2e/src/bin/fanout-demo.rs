//! `make demo`: the main job on one machine. Renders the proxy config for an example workload
//! with `fanout-webhook inject --no-lookup` (the webhook's own code path), takes it out of the
//! pod template annotation as the downward API would project it, and has `fanout-proxy` check it.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use fanout_e2e::bins;
use serde_json::Value;

fn main() -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let manifest = root.join("examples/gateway.yaml");
    let work = PathBuf::from("target/demo");
    std::fs::create_dir_all(&work)?;

    println!(
        "== 1. fanout-webhook inject --no-lookup -f {}",
        manifest.display()
    );
    let output = Command::new(bins::path("fanout-webhook", "fanout-webhook"))
        .args(["inject", "--no-lookup", "-f"])
        .arg(&manifest)
        .output()
        .context("running fanout-webhook")?;
    print!("{}", String::from_utf8_lossy(&output.stderr));
    if !output.status.success() {
        bail!("fanout-webhook inject failed");
    }
    let injected = String::from_utf8(output.stdout)?;
    std::fs::write(work.join("gateway.injected.yaml"), &injected)?;

    let deployment: Value = serde_norway::Deserializer::from_str(&injected)
        .map(serde::Deserialize::deserialize)
        .next()
        .context("no documents in the output")??;
    let template = &deployment["spec"]["template"];
    let containers: Vec<&str> = template["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["name"].as_str())
        .collect();
    println!("   pod template containers: {}", containers.join(", "));
    for env in template["spec"]["containers"][1]["env"]
        .as_array()
        .into_iter()
        .flatten()
    {
        println!(
            "   gateway env {}={}",
            env["name"].as_str().unwrap_or(""),
            env["value"].as_str().unwrap_or("")
        );
    }

    // The downward API projects the annotation's value, byte for byte, to config.json.
    let config = template["metadata"]["annotations"]["fanout.dev/proxy-config"]
        .as_str()
        .context("the template has no fanout.dev/proxy-config annotation")?;
    let config_path = work.join("config.json");
    std::fs::write(&config_path, config)?;
    let pretty: Value = serde_json::from_str(config)?;
    println!("\n== 2. rendered proxy config ({})", config_path.display());
    println!("{}", serde_json::to_string_pretty(&pretty)?);

    println!("\n== 3. fanout-proxy check {}", config_path.display());
    let status = Command::new(bins::path("fanout-proxy", "fanout-proxy"))
        .arg("check")
        .arg(&config_path)
        .status()?;
    if !status.success() {
        bail!("fanout-proxy refused the rendered config");
    }
    println!(
        "\nThe balancing half of the demo (10 backends behind DNS, 4 client connections, \
         calls per backend with and without fanout) arrives with `fanout-proxy run`."
    );
    Ok(())
}
