use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::*;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct TestConfig {
    listen: String,
    waterfall: Waterfall,
    tiers: BTreeMap<String, Tier>,
    auth: Auth,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Waterfall {
    order: Vec<String>,
    #[serde(with = "humantime_serde")]
    failback_after: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Tier {
    host: String,
    port: u16,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Auth {
    user: String,
    token: Option<String>,
}

impl Default for TestConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            waterfall: Waterfall::default(),
            tiers: BTreeMap::new(),
            auth: Auth::default(),
        }
    }
}

impl Default for Waterfall {
    fn default() -> Self {
        Self {
            order: vec!["local".into()],
            failback_after: Duration::from_secs(30),
        }
    }
}

impl Default for Tier {
    fn default() -> Self {
        Self {
            host: "localhost".into(),
            port: 1,
        }
    }
}

const DEFAULTS: &str = r#"listen = "127.0.0.1:8080"

[waterfall]
order = ["local", "docker"]
failback_after = "30s"

[tiers.local]
host = "localhost"
port = 9000

[auth]
user = "cascade"
"#;

struct Fixture {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

fn file(text: &str) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("cascade.toml");
    std::fs::write(&path, text).expect("write config");
    Fixture { _dir: dir, path }
}

fn layers<'a>(
    file: Option<&'a Path>,
    env: &[(&str, &str)],
    overrides: &[(&str, &str, &str)],
) -> Layers<'a> {
    Layers {
        defaults: DEFAULTS,
        file,
        env: env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        prefix: "CASCADE_",
        overrides: overrides
            .iter()
            .map(|(k, v, f)| ((*k).to_owned(), (*v).to_owned(), (*f).to_owned()))
            .collect(),
        base: None,
    }
}

fn load_ok(layers: Layers<'_>) -> Loaded<TestConfig> {
    match load::<TestConfig>(layers) {
        Ok(loaded) => loaded,
        Err(e) => panic!("expected success, got: {e}"),
    }
}

fn problems(layers: Layers<'_>) -> Vec<Problem> {
    match load::<TestConfig>(layers) {
        Err(LoadError::Invalid(problems)) => problems,
        Err(other) => panic!("expected Invalid, got: {other}"),
        Ok(loaded) => panic!("expected problems, got {:?}", loaded.value),
    }
}

fn file_source(path: &Path, line: usize) -> Source {
    Source::File {
        path: path.to_path_buf(),
        line: Some(line),
    }
}

fn env_source(var: &str) -> Source {
    Source::Env { var: var.into() }
}

#[test]
fn defaults_only() {
    let loaded = load_ok(layers(None, &[], &[]));
    let c = loaded.value;
    assert_eq!(c.listen, "127.0.0.1:8080");
    assert_eq!(c.waterfall.order, ["local", "docker"]);
    assert_eq!(c.waterfall.failback_after, Duration::from_secs(30));
    assert_eq!(c.tiers["local"].port, 9000);
    assert_eq!(c.auth.user, "cascade");
    assert_eq!(c.auth.token, None);
}

#[test]
fn file_overrides_default_and_keeps_the_rest() {
    let f = file("[tiers.local]\nport = 9100\n\n[waterfall]\nfailback_after = \"2m\"\n");
    let c = load_ok(layers(Some(&f.path), &[], &[])).value;
    assert_eq!(c.tiers["local"].port, 9100);
    assert_eq!(
        c.tiers["local"].host, "localhost",
        "tables merge, not replace"
    );
    assert_eq!(c.waterfall.failback_after, Duration::from_secs(120));
    assert_eq!(c.waterfall.order, ["local", "docker"]);
}

#[test]
fn env_overrides_file() {
    let f = file("[tiers.local]\nport = 9100\n");
    let c = load_ok(layers(
        Some(&f.path),
        &[("CASCADE_TIERS__LOCAL__PORT", "9200")],
        &[],
    ))
    .value;
    assert_eq!(c.tiers["local"].port, 9200);
}

#[test]
fn flag_overrides_env() {
    let f = file("listen = \"0.0.0.0:1\"\n[tiers.local]\nport = 9100\n");
    let c = load_ok(layers(
        Some(&f.path),
        &[("CASCADE_TIERS__LOCAL__PORT", "9200")],
        &[("tiers.local.port", "9300", "--port")],
    ))
    .value;
    assert_eq!(c.tiers["local"].port, 9300);
}

#[test]
fn later_flags_win_over_earlier_ones() {
    let c = load_ok(layers(
        None,
        &[],
        &[
            ("tiers.local.port", "1", "--a"),
            ("tiers.local.port", "2", "--b"),
        ],
    ))
    .value;
    assert_eq!(c.tiers["local"].port, 2);
}

#[test]
fn more_specific_env_var_wins_whatever_the_order() {
    // Setting a whole table to a scalar and one key inside it conflict; the
    // deeper key is applied last regardless of the order the caller passed.
    let c = load_ok(layers(
        None,
        &[
            ("CASCADE_TIERS__LOCAL__PORT", "5"),
            ("CASCADE_TIERS__LOCAL", "x"),
        ],
        &[],
    ))
    .value;
    assert_eq!(c.tiers["local"].port, 5);
}

#[test]
fn cascade_log_and_foreign_vars_are_ignored() {
    let c = load_ok(layers(
        None,
        &[
            ("CASCADE_LOG", "debug"),
            ("CASCADE_LISTEN", "nope"),
            ("PATH", "/bin"),
            ("OTHER__LISTEN", "nope"),
        ],
        &[],
    ))
    .value;
    assert_eq!(c, load_ok(layers(None, &[], &[])).value);
}

#[test]
fn unknown_key_in_file_suggests_and_points_at_line() {
    let f = file(
        "# comment\nlisten = \"0.0.0.0:1\"\n\n[waterfall]\norder = [\"local\"]\n\n[tiers.local]\nprot = 9100\n",
    );
    let found = problems(layers(Some(&f.path), &[], &[]));
    assert_eq!(
        found,
        [Problem {
            key: "tiers.local.prot".into(),
            message: "unknown key; did you mean `port`?".into(),
            source: file_source(&f.path, 8),
        }]
    );
    assert_eq!(
        found[0].to_string(),
        format!(
            "tiers.local.prot: unknown key; did you mean `port`? ({}:8)",
            f.path.display()
        )
    );
}

#[test]
fn unknown_key_far_from_any_valid_one_lists_the_valid_keys() {
    let f = file("[auth]\nzzzzzz = 1\n");
    let found = problems(layers(Some(&f.path), &[], &[]));
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].key, "auth.zzzzzz");
    assert_eq!(
        found[0].message,
        "unknown key; valid keys are `user`, `token`"
    );
}

#[test]
fn all_problems_in_one_error() {
    let f = file(
        "lissten = \"x\"\n\n[waterfall]\nordr = [\"a\"]\nfailback_after = \"soon\"\n\n[tiers.local]\nport = \"abc\"\n",
    );
    let err = load::<TestConfig>(layers(Some(&f.path), &[], &[])).err();
    let Some(LoadError::Invalid(found)) = &err else {
        panic!("expected Invalid, got {err:?}");
    };
    let mut got: Vec<(&str, Source)> = found
        .iter()
        .map(|p| (p.key.as_str(), p.source.clone()))
        .collect();
    got.sort_by(|a, b| a.0.cmp(b.0));
    assert_eq!(
        got,
        [
            ("lissten", file_source(&f.path, 1)),
            ("tiers.local.port", file_source(&f.path, 8)),
            ("waterfall.failback_after", file_source(&f.path, 5)),
            ("waterfall.ordr", file_source(&f.path, 4)),
        ]
    );
    let port = found
        .iter()
        .find(|p| p.key == "tiers.local.port")
        .map(|p| p.message.clone());
    assert_eq!(port.as_deref(), Some("expected u16, found a string"));
    let text = err.map(|e| e.to_string()).unwrap_or_default();
    assert!(
        text.starts_with("configuration has 4 problems:\n  "),
        "{text}"
    );
    assert_eq!(text.lines().count(), 5, "{text}");
    assert!(text.contains("did you mean `listen`?"), "{text}");
    assert!(text.contains("did you mean `order`?"), "{text}");
}

#[test]
fn two_unknown_keys_and_a_type_error_make_three_problems() {
    let f = file("[tiers.local]\nprot = 1\nhots = \"h\"\n\n[auth]\nuser = 5\n");
    let found = problems(layers(Some(&f.path), &[], &[]));
    assert_eq!(found.len(), 3, "{found:?}");
    let keys: Vec<&str> = found.iter().map(|p| p.key.as_str()).collect();
    assert!(keys.contains(&"tiers.local.prot"), "{keys:?}");
    assert!(keys.contains(&"tiers.local.hots"), "{keys:?}");
    assert!(keys.contains(&"auth.user"), "{keys:?}");
}

#[test]
fn type_error_from_env_names_the_variable() {
    let found = problems(layers(None, &[("CASCADE_TIERS__LOCAL__PORT", "abc")], &[]));
    assert_eq!(
        found,
        [Problem {
            key: "tiers.local.port".into(),
            message: "expected u16, found a string".into(),
            source: env_source("CASCADE_TIERS__LOCAL__PORT"),
        }]
    );
    assert_eq!(
        found[0].to_string(),
        "tiers.local.port: expected u16, found a string \
         (environment variable CASCADE_TIERS__LOCAL__PORT)"
    );
}

#[test]
fn out_of_range_number_from_flag_reports_the_number() {
    let found = problems(layers(
        None,
        &[],
        &[("tiers.local.port", "70000", "--port")],
    ));
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].message, "expected u16, found 70000");
    assert_eq!(
        found[0].source,
        Source::Flag {
            flag: "--port".into()
        }
    );
}

#[test]
fn numeric_and_boolean_looking_env_values_still_fill_strings() {
    let c = load_ok(layers(
        None,
        &[
            ("CASCADE_AUTH__TOKEN", "123456"),
            ("CASCADE_AUTH__USER", "true"),
        ],
        &[],
    ))
    .value;
    assert_eq!(c.auth.token.as_deref(), Some("123456"));
    assert_eq!(c.auth.user, "true");
}

#[test]
fn unknown_key_from_env_names_the_variable() {
    let found = problems(layers(None, &[("CASCADE_TIERS__LOCAL__PROT", "1")], &[]));
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].key, "tiers.local.prot");
    assert_eq!(found[0].message, "unknown key; did you mean `port`?");
    assert_eq!(found[0].source, env_source("CASCADE_TIERS__LOCAL__PROT"));
}

#[test]
fn malformed_env_names_and_flag_keys_are_problems() {
    let found = problems(layers(
        None,
        &[("CASCADE_TIERS____PORT", "1")],
        &[("tiers..port", "1", "--bad")],
    ));
    assert_eq!(found.len(), 2, "{found:?}");
    assert_eq!(found[0].source, env_source("CASCADE_TIERS____PORT"));
    assert_eq!(found[1].key, "tiers..port");
    assert_eq!(
        found[1].source,
        Source::Flag {
            flag: "--bad".into()
        }
    );
}

#[test]
fn syntax_error_reports_path_and_line() {
    let f = file("listen = \"a\"\n\n[waterfall]\norder = [\"a\",\n\n[tiers]\n");
    let err = load::<TestConfig>(layers(Some(&f.path), &[], &[])).err();
    match &err {
        Some(LoadError::Syntax {
            path,
            line,
            message,
        }) => {
            assert_eq!(path, &f.path);
            assert_eq!(*line, 6, "{message}");
            assert!(!message.contains('\n'));
        }
        other => panic!("expected Syntax, got {other:?}"),
    }

    let f = file("a = 1\nb = \n");
    match load::<TestConfig>(layers(Some(&f.path), &[], &[])) {
        Err(e @ LoadError::Syntax { line: 2, .. }) => {
            let text = e.to_string();
            let prefix = format!("{}:2: not valid TOML: ", f.path.display());
            assert!(text.starts_with(&prefix), "{text}");
        }
        other => panic!("expected Syntax at line 2, got {:?}", other.err()),
    }
}

#[test]
fn broken_defaults_are_a_syntax_error_not_a_panic() {
    let mut l = layers(None, &[], &[]);
    l.defaults = "x = \n";
    match load::<TestConfig>(l) {
        Err(LoadError::Syntax { path, line, .. }) => {
            assert_eq!(path, Path::new("<built-in defaults>"));
            assert_eq!(line, 1);
        }
        other => panic!("expected Syntax, got {:?}", other.err()),
    }
}

#[test]
fn missing_file_is_a_read_error_naming_the_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("nope.toml");
    match load::<TestConfig>(layers(Some(&path), &[], &[])) {
        Err(e @ LoadError::Read { .. }) => {
            let text = e.to_string();
            assert!(
                text.starts_with(&format!("cannot read config file {}: ", path.display())),
                "{text}"
            );
        }
        other => panic!("expected Read, got {:?}", other.err()),
    }
}

#[test]
fn list_from_env() {
    let c = load_ok(layers(
        None,
        &[("CASCADE_WATERFALL__ORDER", "docker, local,remote")],
        &[],
    ))
    .value;
    assert_eq!(c.waterfall.order, ["docker", "local", "remote"]);

    let c = load_ok(layers(None, &[("CASCADE_WATERFALL__ORDER", "docker")], &[])).value;
    assert_eq!(c.waterfall.order, ["docker"]);

    // A key with no array in the lower layers still accepts a list if its
    // type wants one.
    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Extra {
        listen: String,
        waterfall: Waterfall,
        tiers: BTreeMap<String, Tier>,
        auth: Auth,
        more: BTreeMap<String, Vec<String>>,
    }
    let loaded = load::<Extra>(layers(None, &[("CASCADE_MORE__X", "a,b")], &[]));
    let more = loaded.map(|l| l.value.more).ok();
    assert_eq!(
        more.and_then(|m| m.get("x").cloned()),
        Some(vec!["a".into(), "b".into()])
    );
}

#[test]
fn type_error_inside_a_list_names_the_original_index() {
    let f = file("[waterfall]\norder = [\n  1,\n  \"local\",\n  2,\n]\n");
    let found = problems(layers(Some(&f.path), &[], &[]));
    let got: Vec<(String, Source)> = found
        .iter()
        .map(|p| (p.key.clone(), p.source.clone()))
        .collect();
    assert_eq!(
        got,
        [
            ("waterfall.order[0]".to_owned(), file_source(&f.path, 3)),
            ("waterfall.order[2]".to_owned(), file_source(&f.path, 5)),
        ]
    );
    assert_eq!(found[0].message, "expected a string, found 1");
}

#[test]
fn provenance_names_each_layer() {
    let f =
        file("listen = \"0.0.0.0:1\"\n\n[tiers.local]\nhost = \"h\"\n\n[tiers.gpu]\nport = 7\n");
    let loaded = load_ok(layers(
        Some(&f.path),
        &[
            ("CASCADE_TIERS__LOCAL__PORT", "9200"),
            ("CASCADE_WATERFALL__ORDER", "a,b,c"),
        ],
        &[("tiers.gpu.port", "8", "--gpu-port")],
    ));
    let p = &loaded.provenance;
    assert_eq!(p.source_of("auth.user"), Source::Default);
    assert_eq!(p.source_of("waterfall.failback_after"), Source::Default);
    assert_eq!(p.source_of("listen"), file_source(&f.path, 1));
    assert_eq!(p.source_of("tiers.local.host"), file_source(&f.path, 4));
    // A table points at its header.
    assert_eq!(p.source_of("tiers.local"), file_source(&f.path, 3));
    assert_eq!(
        p.source_of("tiers.local.port"),
        env_source("CASCADE_TIERS__LOCAL__PORT")
    );
    // Elements of a list set as a whole come from whoever set the list.
    assert_eq!(
        p.source_of("waterfall.order[2]"),
        env_source("CASCADE_WATERFALL__ORDER")
    );
    assert_eq!(
        p.source_of("tiers.gpu.port"),
        Source::Flag {
            flag: "--gpu-port".into()
        }
    );
    assert_eq!(loaded.value.tiers["gpu"].port, 8);

    let problem = p.problem("tiers.local.host", "cannot resolve");
    assert_eq!(
        problem.to_string(),
        format!("tiers.local.host: cannot resolve ({}:4)", f.path.display())
    );
}

#[test]
fn provenance_covers_inline_tables_and_arrays_of_tables() {
    #[derive(Debug, Default, Deserialize)]
    #[serde(default)]
    struct Loose {
        backends: Vec<BTreeMap<String, String>>,
        inline: BTreeMap<String, BTreeMap<String, u16>>,
    }
    let f = file(
        "inline = { a = { port = 1 } }\n\n[[backends]]\nname = \"x\"\n\n[[backends]]\nname = \"y\"\n",
    );
    let mut l = layers(Some(&f.path), &[], &[]);
    l.defaults = "";
    let loaded = match load::<Loose>(l) {
        Ok(loaded) => loaded,
        Err(e) => panic!("{e}"),
    };
    let p = &loaded.provenance;
    assert_eq!(p.source_of("inline.a.port"), file_source(&f.path, 1));
    assert_eq!(p.source_of("backends[1]"), file_source(&f.path, 6));
    assert_eq!(p.source_of("backends[1].name"), file_source(&f.path, 7));
    assert_eq!(p.source_of("backends"), file_source(&f.path, 3));
    assert_eq!(loaded.value.backends.len(), 2);
}

#[test]
fn source_display() {
    assert_eq!(Source::Default.to_string(), "built-in default");
    assert_eq!(
        file_source(Path::new("/etc/cascade.toml"), 12).to_string(),
        "/etc/cascade.toml:12"
    );
    assert_eq!(
        Source::File {
            path: "/etc/cascade.toml".into(),
            line: None
        }
        .to_string(),
        "/etc/cascade.toml"
    );
    assert_eq!(
        env_source("CASCADE_TIERS__LOCAL__PORT").to_string(),
        "environment variable CASCADE_TIERS__LOCAL__PORT"
    );
    assert_eq!(
        Source::Flag {
            flag: "--listen".into()
        }
        .to_string(),
        "flag --listen"
    );
    let one = LoadError::Invalid(vec![Problem {
        key: "a".into(),
        message: "bad".into(),
        source: Source::Default,
    }]);
    assert_eq!(
        one.to_string(),
        "configuration has 1 problem:\n  a: bad (built-in default)"
    );
}

#[test]
fn render_redacted_hides_secrets_and_keeps_the_rest() {
    let mut c = load_ok(layers(None, &[], &[])).value;
    c.auth.token = Some("s3cr3t-value".into());
    let text = match render_redacted(&c) {
        Ok(text) => text,
        Err(e) => panic!("{e}"),
    };
    assert!(!text.contains("s3cr3t-value"), "{text}");
    assert!(text.contains("token = \"<redacted>\""), "{text}");
    // Everything in a table named like a secret is hidden.
    assert!(text.contains("user = \"<redacted>\""), "{text}");
    assert!(text.contains("port = 9000"), "{text}");
    assert!(text.contains("failback_after = \"30s\""), "{text}");
    assert!(text.contains("order = [\"local\", \"docker\"]"), "{text}");
    // The output is itself a loadable config.
    let back = load_ok(Layers {
        defaults: &text,
        file: None,
        env: Vec::new(),
        prefix: "CASCADE_",
        overrides: Vec::new(),
        base: None,
    })
    .value;
    assert_eq!(back.tiers, c.tiers);
    assert_eq!(back.auth.token.as_deref(), Some("<redacted>"));
    assert_eq!(back.auth.user, "<redacted>");

    // Unset and empty secrets have nothing to hide.
    c.auth.token = Some(String::new());
    let text = render_redacted(&c).unwrap_or_default();
    assert!(text.contains("token = \"\""), "{text}");

    #[derive(Serialize)]
    struct Secrets {
        #[serde(rename = "DB_Password")]
        db_password: String,
        api_secret: u32,
        credentials: BTreeMap<String, String>,
        keyring: String,
    }
    let text = render_redacted(&Secrets {
        db_password: "p".into(),
        api_secret: 7,
        credentials: BTreeMap::from([("user".into(), "u".into())]),
        keyring: "visible".into(),
    })
    .unwrap_or_default();
    assert!(text.contains("DB_Password = \"<redacted>\""), "{text}");
    assert!(text.contains("api_secret = \"<redacted>\""), "{text}");
    assert!(text.contains("user = \"<redacted>\""), "{text}");
    assert!(!text.contains("visible"), "{text}");
}

#[test]
fn hostile_input_never_panics() {
    let inputs = [
        "",
        "[",
        "x = 1\n[x]\n",
        "listen = 1e400\n",
        "listen = nan\n",
        "[[waterfall]]\n",
        "waterfall = [1, {a = 2}]\n",
        "tiers = 5\n",
        "[tiers.local.port]\n",
        "\"a.b\" = 1\n\"c d\" = 2\n",
        "listen = 1979-05-27T07:32:00Z\n",
    ];
    for input in inputs {
        let f = file(input);
        let _ = load::<TestConfig>(layers(
            Some(&f.path),
            &[
                ("CASCADE_A__B", ""),
                ("CASCADE___", "x"),
                ("CASCADE_TIERS__LOCAL", "5"),
                ("CASCADE_WATERFALL__ORDER", ",,,"),
            ],
            &[
                ("tiers.local.port[3]", "1", "--x"),
                ("", "1", "--empty"),
                ("[0]", "1", "--idx"),
                ("a[99999999999999999999]", "1", "--big"),
            ],
        ));
    }
    let p = Provenance::default();
    for key in ["", ".", "[", "a[", "a[x]", "a]]", "..", "a.b[0][1].c"] {
        assert_eq!(p.source_of(key), Source::Default);
    }
}
