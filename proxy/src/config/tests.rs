use super::*;

fn args() -> ServeArgs {
    ServeArgs::default()
}

#[test]
fn dev_default_without_anything() {
    let c = Config::build(&args()).unwrap();
    assert_eq!(
        c.ws_listen,
        vec![DEV_WS_LISTEN.parse::<SocketAddr>().unwrap()]
    );
    assert_eq!(c.connect_listen.len(), 1);
    assert!(matches!(c.tenant_tls, TenantTls::Dev { .. }));
    assert_eq!(c.connect_auth, ConnectAuth::Token);
    assert!(c.dev_tokens.is_some());
    assert_eq!(c.ping_interval, Some(Duration::from_secs(30)));
}

#[test]
fn plain_http_only_on_loopback() {
    let mut a = args();
    a.token_file = vec!["t".into()];
    a.plain_http = true;
    a.ws_listen = vec!["0.0.0.0:6080".parse().unwrap()];
    assert!(matches!(
        Config::build(&a),
        Err(ConfigError::PlainHttpNotLoopback(_))
    ));
    a.ws_listen = vec!["[::1]:6080".parse().unwrap()];
    assert_eq!(Config::build(&a).unwrap().tenant_tls, TenantTls::Off);
}

#[test]
fn flags_override_file_and_paths_are_relative_to_file() {
    let fc = FileConfig::parse(
        "[websocket]\nlisten=['127.0.0.1:1']\nping_interval='5s'\n[tokens]\nfiles=['tok']\n\
         [tls]\ncert='c.pem'\nkey='k.pem'\n",
        Path::new("/etc/cg/consolegate.toml"),
    )
    .unwrap();
    assert_eq!(fc.tokens.files, vec![PathBuf::from("/etc/cg/tok")]);
    assert_eq!(fc.tls.cert, Some(PathBuf::from("/etc/cg/c.pem")));
    let e = FileConfig::parse("[websocket]\nbogus=1\n", Path::new("x")).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.starts_with("config x: line 2, column 1: unknown field `bogus`"),
        "{msg}"
    );
    assert_eq!(msg.lines().count(), 1);
}

/// `kernel.ktls_records_per_key`: a positive count; 0 and other types
/// are refused with the key named.
#[test]
fn ktls_records_per_key_is_a_positive_count() {
    let parse = |v: &str| {
        FileConfig::parse(
            &format!("[kernel]\nktls_records_per_key = {v}\n"),
            Path::new("x"),
        )
    };
    assert_eq!(
        parse("48")
            .unwrap()
            .kernel
            .ktls_records_per_key
            .map(std::num::NonZeroU64::get),
        Some(48)
    );
    for bad in ["0", "-1", "'many'", "1.5"] {
        let e = parse(bad).unwrap_err().to_string();
        assert!(e.contains("ktls_records_per_key"), "{bad}: {e}");
    }
    assert_eq!(
        FileConfig::parse("", Path::new("x"))
            .unwrap()
            .kernel
            .ktls_records_per_key,
        None
    );
}

#[test]
fn kernel_settings_flags_override_file() {
    let fc = FileConfig::parse(
        "[tokens]\nfiles=['t']\n[websocket]\nlisten=['127.0.0.1:1']\n\
         [kernel]\ndatapath='copy'\nallowlist='required'\ncgroup='current'\n",
        Path::new("/etc/cg/c.toml"),
    )
    .unwrap();
    assert_eq!(fc.kernel.datapath, Some(kernel::DatapathMode::Copy));
    assert_eq!(fc.kernel.allowlist, Some(kernel::AllowListMode::Required));
    assert_eq!(fc.kernel.cgroup, Some(kernel::CgroupMode::Current));
    assert!(FileConfig::parse("[kernel]\ndatapath='fast'\n", Path::new("x")).is_err());
    let mut a = args();
    a.token_file = vec!["t".into()];
    a.connect_listen = vec!["127.0.0.1:1".parse().unwrap()];
    a.datapath = Some(kernel::DatapathMode::Splice);
    a.allowlist = Some(kernel::AllowListMode::Off);
    let c = Config::build(&a).unwrap();
    assert_eq!(c.datapath, kernel::DatapathMode::Splice);
    assert_eq!(c.allowlist, kernel::AllowListMode::Off);
    let c = Config::build(&ServeArgs {
        token_file: vec!["t".into()],
        connect_listen: vec!["127.0.0.1:1".parse().unwrap()],
        ..Default::default()
    })
    .unwrap();
    assert_eq!(
        (c.datapath, c.allowlist, c.cgroup),
        (
            kernel::DatapathMode::Auto,
            kernel::AllowListMode::Auto,
            kernel::CgroupMode::Own
        )
    );
}

#[test]
fn example_config_is_valid() {
    let path = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/consolegate.example.toml"
    ));
    let fc = FileConfig::read(path).unwrap();
    assert_eq!(fc.websocket.listen.len(), 2);
    assert_eq!(fc.connect.auth, Some(ConnectAuthArg::Token));
    let a = ServeArgs {
        config: Some(path.to_owned()),
        ..Default::default()
    };
    let c = Config::build(&a).unwrap();
    assert_eq!(
        c.allow_origins,
        vec!["https://console.example.com".to_owned()]
    );
    assert_eq!(c.idle_timeout, Some(Duration::from_secs(3600)));
    assert!(matches!(c.tenant_tls, TenantTls::Files { .. }));
    assert_eq!(c.token_sources.len(), 2);
    assert_eq!(c.resolvers.reconnect_window, Duration::from_secs(30));
    assert_eq!(c.resolvers.store, tokens::StoreKind::Redis);
    assert!(c.resolvers.redis.is_some() && c.resolvers.http.is_some());
    assert_eq!(c.resolvers.signed_keys.len(), 1);
    let admin = c.admin.as_ref().unwrap();
    assert_eq!(admin.auth, tokens::AdminAuthKind::Required);
    assert!(admin.key_file.as_ref().is_some_and(|p| p.is_absolute()));
    assert_eq!(c.default_profile.as_deref(), Some("qemu"));
    assert_eq!(c.datapath, kernel::DatapathMode::Auto);
    assert_eq!(c.allowlist, kernel::AllowListMode::Auto);
    assert_eq!(c.cgroup, kernel::CgroupMode::Own);
    let q = &c.profiles["qemu"];
    assert_eq!(q.require_tls, Some(true));
    assert!(
        q.ca.as_ref().is_some_and(|p| p.is_absolute()),
        "relative to the file"
    );
}

#[test]
fn installed_service_config_is_valid() {
    // proxy/dist/consolegate.toml is what `cargo xtask install` puts in
    // /etc/consolegate for the systemd unit.
    let path = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/dist/consolegate.toml"
    ));
    let a = ServeArgs {
        config: Some(path.to_owned()),
        ..Default::default()
    };
    let c = Config::build(&a).unwrap();
    assert_eq!(c.drain_timeout, Duration::from_secs(30));
    assert_eq!(c.log_format, LogFormat::Json);
    assert!(c.ws_listen.iter().all(|a| a.ip().is_loopback()));
    assert!(matches!(c.tenant_tls, TenantTls::Dev { .. }));
    assert!(c.token_sources[0].ends_with("dist/tokens.toml"));
}

#[test]
fn web_dir_is_canonical_and_must_exist() {
    let fc = FileConfig::parse(
        "[websocket]\nweb = 'console'\n",
        Path::new("/etc/cg/consolegate.toml"),
    )
    .unwrap();
    assert_eq!(fc.websocket.web, Some(PathBuf::from("/etc/cg/console")));
    let mut a = args();
    assert_eq!(Config::build(&a).unwrap().web, None);
    a.web = Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/../src"));
    let c = Config::build(&a).unwrap();
    let want = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src")
        .canonicalize()
        .unwrap();
    assert_eq!(c.web, Some(want));
    a.web = Some(PathBuf::from("/nonexistent/consolegate-web"));
    assert!(matches!(Config::build(&a), Err(ConfigError::WebDir { .. })));
    a.web = Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"));
    let e = Config::build(&a).unwrap_err();
    assert!(e.to_string().contains("not a directory"), "{e}");
}

#[test]
fn bad_values_are_errors() {
    let mut a = args();
    a.idle_timeout = Some("soon".into());
    assert!(matches!(
        Config::build(&a),
        Err(ConfigError::Duration { .. })
    ));
    let mut a = args();
    a.allow_origin = vec!["example.com".into()];
    assert!(matches!(Config::build(&a), Err(ConfigError::BadOrigin(_))));
    let mut a = args();
    a.idle_timeout = Some("0".into());
    assert_eq!(Config::build(&a).unwrap().idle_timeout, None);
}
