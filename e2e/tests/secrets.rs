//! Secrets never travel on a command line (issue 9, defect 10): every local
//! user can read `/proc/<pid>/cmdline`. Each service binary takes its
//! passwords from a file or its environment only.

#[test]
fn no_service_takes_a_password_as_a_command_line_value() {
    let env_bin = std::env::var("HOMELINK_TEST_BIN_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug"));
    for bin in ["homelink-command-api", "homelink-device-bridge", "homelink-projector", "homelink-query-api", "homelink"] {
        let out =
            std::process::Command::new(env_bin.join(bin)).arg("--help").output().expect("run --help (built by cargo build --workspace)");
        assert!(out.status.success(), "{bin} --help");
        let help = String::from_utf8_lossy(&out.stdout);
        let flags: Vec<&str> = help.split_whitespace().filter(|w| w.starts_with("--") && w.contains("password")).collect();
        assert!(flags.iter().all(|f| f.trim_end_matches(',').ends_with("-file")), "{bin} takes a password on the command line: {flags:?}");
    }
    // The bridge's password flag of old is refused outright.
    let out = std::process::Command::new(env_bin.join("homelink-device-bridge")).args(["--mqtt-password", "x"]).output().expect("run");
    assert!(!out.status.success());
}
