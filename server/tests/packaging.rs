//! What an operator installs: the systemd unit and the release tarball.

use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_cubby-server");

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the repository").to_path_buf()
}

/// `systemd-analyze`, installed from Debian's packages when the machine lacks it.
fn systemd_analyze() -> &'static str {
    let found = || Command::new("systemd-analyze").arg("--version").output().is_ok();
    if !found() {
        let installed = Command::new("sh")
            .args(["-c", "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd"])
            .status();
        assert!(
            installed.is_ok_and(|s| s.success()) && found(),
            "systemd-analyze is missing and could not be installed (apt-get install systemd)"
        );
    }
    "systemd-analyze"
}

#[test]
fn the_systemd_unit_verifies_and_is_hardened() {
    let unit =
        std::fs::read_to_string(repo().join("packaging/cubby-server.service")).expect("the unit");
    // Checked as installed, with the binary where the unit expects it: here, this build's.
    assert!(unit.contains("ExecStart=/usr/local/bin/cubby-server "), "{unit}");
    let dir = tempfile::tempdir().expect("temp dir");
    let copy = dir.path().join("cubby-server.service");
    std::fs::write(&copy, unit.replace("/usr/local/bin/cubby-server", BIN)).expect("write");
    let tool = systemd_analyze();
    let verified = Command::new(tool).arg("verify").arg(&copy).output().expect("runs");
    let said = String::from_utf8_lossy(&verified.stderr);
    assert!(verified.status.success() && said.trim().is_empty(), "systemd-analyze verify: {said}");

    let security =
        Command::new(tool).args(["security", "--offline=true"]).arg(&copy).output().expect("runs");
    let report = String::from_utf8_lossy(&security.stdout);
    let exposure: f64 = report
        .lines()
        .find_map(|l| l.split("Overall exposure level for cubby-server.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in {report}"));
    assert!(exposure <= 2.0, "systemd rates the unit's exposure {exposure}: {report}");
}

#[test]
fn the_release_tarball_holds_the_binaries_configs_unit_and_license() {
    let bins = Path::new(BIN).parent().expect("the binaries' directory");
    assert!(
        bins.join("cubby").exists(),
        "the CLI is built beside the server by `cargo test --workspace` (run that)"
    );
    let out = tempfile::tempdir().expect("temp dir");
    let made = Command::new("bash")
        .arg(repo().join("packaging/release.sh"))
        .arg("--bin-dir")
        .arg(bins)
        .arg("--out")
        .arg(out.path())
        .output()
        .expect("the script runs");
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let tarball = PathBuf::from(String::from_utf8_lossy(&made.stdout).trim());
    let listed = Command::new("tar").arg("-tzf").arg(&tarball).output().expect("tar runs");
    let names = String::from_utf8_lossy(&listed.stdout);
    let version = env!("CARGO_PKG_VERSION");
    for part in [
        "bin/cubby-server",
        "bin/cubby",
        "config/prod.toml",
        "config/dev.toml",
        "systemd/cubby-server.service",
        "Dockerfile",
        "README.md",
        "LICENSE",
    ] {
        assert!(
            names.lines().any(|n| n.starts_with(&format!("cubby-{version}-")) && n.ends_with(part)),
            "{part} in {names}"
        );
    }
    let sum = std::fs::read_to_string(format!("{}.sha256", tarball.display())).expect("checksum");
    assert!(sum.contains(tarball.file_name().and_then(|n| n.to_str()).expect("a name")));
}

#[test]
fn the_license_file_is_the_one_cargo_toml_names() {
    let manifest = std::fs::read_to_string(repo().join("Cargo.toml")).expect("Cargo.toml");
    assert!(manifest.contains("license = \"Apache-2.0\""));
    let license = std::fs::read_to_string(repo().join("LICENSE")).expect("LICENSE");
    assert!(license.contains("Apache License") && license.contains("Version 2.0, January 2004"));
}
