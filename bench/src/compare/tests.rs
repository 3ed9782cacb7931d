//! Settings parsing and derived figures of `loadgen compare`.

use super::*;

#[test]
fn peer_filter_selects_services_and_rows_by_prefix() {
    let args = CompareArgs::parse_from(["x", "--peers", "haproxy-tls,consolegate"]);
    let s = Settings::from_args(&args).unwrap();
    assert!(s.wants_service("haproxy") && s.wants_service("consolegate-tls"));
    assert!(!s.wants_service("nginx") && !s.wants_service("direct"));
    assert!(s.wants_row("haproxy-tls") && s.wants_row("haproxy-tls2"));
    assert!(!s.wants_row("haproxy-tcp"));
    assert!(s.wants_row("consolegate-ws-copy"));
    let ws =
        Settings::from_args(&CompareArgs::parse_from(["x", "--peers", "consolegate-ws"])).unwrap();
    assert!(ws.wants_service("consolegate-copy") && ws.wants_service("consolegate-tls"));
    assert!(ws.wants_row("consolegate-ws-copy") && !ws.wants_row("consolegate-connect-copy"));
    let all = Settings::from_args(&CompareArgs::parse_from(["x"])).unwrap();
    assert!(all.wants_service("nginx") && all.wants_row("nginx-tls"));
    assert_eq!((all.runs, all.mode), (3, "quick"));
    assert_eq!((all.source_addrs, all.echo_listeners), (0, 1));
    let big =
        Settings::from_args(&CompareArgs::parse_from(["x", "--idle-sessions", "50000"])).unwrap();
    let need = crate::scale::addresses_for(50_000, crate::scale::per_address());
    assert!(need >= 2);
    assert_eq!((big.source_addrs, big.echo_listeners), (need, need));
    assert!(big.run_timeout >= Duration::from_secs(500));
    let forced = Settings::from_args(&CompareArgs::parse_from(["x", "--spread", "3"])).unwrap();
    assert_eq!((forced.source_addrs, forced.echo_listeners), (3, 3));
}

#[derive(Debug, clap::Parser)]
struct Wrap {
    #[command(flatten)]
    args: CompareArgs,
}

impl CompareArgs {
    fn parse_from(argv: impl IntoIterator<Item = &'static str>) -> Self {
        use clap::Parser as _;
        Wrap::parse_from(argv).args
    }
}

#[test]
fn cpu_lists_parse_like_taskset() {
    assert_eq!(Settings::cpus(Some("0")), Some(vec![0]));
    assert_eq!(Settings::cpus(Some("1-3,5")), Some(vec![1, 2, 3, 5]));
    assert_eq!(Settings::cpus(None), None);
    assert_eq!(Settings::cpus(Some("x")), None);
}

#[test]
fn pki_files_chain_to_the_ca() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate(dir.path()).unwrap();
    let tls = crate::tls::TlsClient::from_ca_file(&pki.ca, "localhost").unwrap();
    assert!(tls.config.alpn_protocols.is_empty());
    let combined = fs::read_to_string(&pki.combined).unwrap();
    assert_eq!(combined.matches("BEGIN CERTIFICATE").count(), 2);
    assert!(combined.contains("PRIVATE KEY"));
}
