//! Loader tests: the contract example, planted mistakes with exact positions, hostile input.

use super::*;
use proptest::prelude::*;

const REFERENCE: &str = include_str!("../../../examples/reference.toml");

fn errors(text: &str) -> Vec<String> {
    match parse(Path::new("site.toml"), text) {
        Ok(_) => Vec::new(),
        Err(e) => e.to_string().lines().map(str::to_string).collect(),
    }
}

#[test]
fn reference_example_is_valid() {
    let site =
        parse(Path::new("reference.toml"), REFERENCE).expect("reference example must validate");
    assert_eq!(site.gre.len(), 1);
    assert_eq!(
        site.gre[0].keepalive.as_ref().map(|k| *k.retries.get_ref()),
        Some(3)
    );
    assert_eq!(site.nat.as_ref().map(|n| n.statics.len()), Some(1));
    assert_eq!(site.service[0].backends.get_ref().len(), 2);
    assert_eq!(site.vrrp[0].vrid.get_ref().get(), 51);
    assert_eq!(site.ssh[0].local.len(), 1);
}

#[test]
fn three_planted_mistakes_give_three_positions() {
    // The range mistake is on an optional key: a required key serde refuses (`vrid = 256`)
    // drops its instance, and with it the instance's cross-references (`track_services`).
    let text = REFERENCE
        .replace("priority = 150", "priority = 256")
        .replace("weight = 2 }", "weight = 65536 }")
        .replace("track_services = [\"web\"]", "track_services = [\"wbe\"]");
    let errs = errors(&text);
    assert_eq!(errs.len(), 3, "{errs:#?}");
    let line_of = |needle: &str| text.lines().position(|l| l.contains(needle)).unwrap() + 1;
    assert!(
        errs[0].starts_with(&format!("site.toml:{}:", line_of("weight = 65536"))),
        "{errs:?}"
    );
    assert!(errs[0].contains("over 65535"));
    assert!(
        errs[1].starts_with(&format!(
            "site.toml:{}:12: priority 256 is out of range 1..=254",
            line_of("priority = 256")
        )),
        "{errs:?}"
    );
    assert!(errs[2].contains("did you mean `web`"), "{errs:?}");
}

#[test]
fn unknown_key_has_a_hint_and_position() {
    let errs = errors(
        "[[gre]]\nname = \"g\"\nlocal = \"1.1.1.1\"\nremote = \"1.1.1.2\"\naddress = \"10.9.0.1/30\"\nrouts = []\n",
    );
    assert_eq!(errs.len(), 1);
    assert!(
        errs[0].starts_with("site.toml:6:1: unknown key `routs` (did you mean `routes`?)"),
        "{errs:?}"
    );
}

#[test]
fn semantic_checks() {
    let dup = "[[gre]]\nname = \"a\"\nlocal = \"1.1.1.1\"\nremote = \"1.1.1.2\"\naddress = \"10.9.0.1/30\"\nroutes = [\"10.1.0.0/16\"]\n\
               [[gre]]\nname = \"a\"\nlocal = \"1.1.1.1\"\nremote = \"1.1.1.3\"\naddress = \"10.9.0.5/30\"\nroutes = [\"10.1.2.0/24\"]\n";
    let errs = errors(dup);
    assert!(
        errs.iter()
            .any(|e| e.contains("duplicate tunnel name `a` (first defined on line 2)")),
        "{errs:?}"
    );
    assert!(
        errs.iter()
            .any(|e| e.contains("overlaps route 10.1.0.0/16")),
        "{errs:?}"
    );

    let nat = "[nat]\ninside = [\"eth1\"]\noutside = \"eth0\"\naddress = \"192.0.2.1\"\n\
               [[nat.static]]\nproto = \"tcp\"\noutside_port = 8001\ninside = \"10.0.0.1:80\"\n\
               [[nat.static]]\nproto = \"tcp\"\noutside_port = 8001\ninside = \"10.0.0.2:80\"\n";
    let errs = errors(nat);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].starts_with("site.toml:11:16: duplicate static port `tcp/192.0.2.1:8001`"),
        "{errs:?}"
    );

    let queues = "[nat]\ninside = [\"eth1\"]\noutside = \"eth0\"\naddress = \"192.0.2.1\"\n\
                  queues = 9\n";
    assert_eq!(
        errors(queues),
        ["site.toml:5:10: queues must be between 1 and 8"]
    );

    let datapath = "[nat]\ninside = [\"eth1\"]\noutside = \"eth0\"\naddress = \"192.0.2.1\"\n\
                    datapath = \"xdp\"\n";
    assert_eq!(
        errors(datapath),
        ["site.toml:5:12: datapath must be \"kernel\" or \"tun\", not \"xdp\""]
    );
    for ok in ["kernel", "tun"] {
        let good = datapath.replace("xdp", ok);
        assert!(errors(&good).is_empty(), "{ok}");
    }

    // A director's gateway takes its data path from [lb]; with [nat], [nat] decides.
    let director = "[lb]\ndatapath = \"xdp\"\n\n[[service]]\nname = \"web\"\n\
                    listen = \"192.0.2.10:80\"\nbackends = [{ address = \"10.0.0.1:80\" }]\n";
    assert_eq!(
        errors(director),
        ["site.toml:2:12: datapath must be \"kernel\" or \"tun\", not \"xdp\""]
    );
    assert!(errors(&director.replace("xdp", "tun")).is_empty());
    let both = format!(
        "{}\n[nat]\ninside = [\"eth1\"]\noutside = \"eth0\"\naddress = \"192.0.2.1\"\n",
        director.replace("xdp", "tun")
    );
    assert_eq!(
        errors(&both),
        [
            "site.toml:2:12: with [nat] the services join the PAT gateway: set its data path with [nat] datapath"
        ]
    );

    let prio = REFERENCE.replace("priority = 150", "priority = 255");
    assert!(
        errors(&prio)
            .iter()
            .any(|e| e.contains("reserved for the address owner"))
    );
    let zero = REFERENCE.replace("priority = 150", "priority = 0");
    assert!(
        errors(&zero)
            .iter()
            .any(|e| e.contains("priority 0 is out of range"))
    );
    let spec = REFERENCE.replace("\"9000:localhost:22\"", "\"9000:localhost\"");
    assert!(
        errors(&spec)
            .iter()
            .any(|e| e.contains("bad remote forwarding specification '9000:localhost'"))
    );
}

#[test]
fn hostile_files_explain_themselves() {
    assert!(errors("")[0].contains("the file is empty"));
    assert!(errors("  \n\n")[0].contains("the file is empty"));
    assert!(errors("this is not toml ][")[0].contains("not valid TOML"));
    let e = errors("[wormhole]\nx = 1\n");
    assert_eq!(
        e,
        vec![
            "site.toml:1:2: unknown section `wormhole`; the sections are [daemon], [gre], [nat], [lb], [service], [http], [vrrp], [vrrp_group], [ssh], [sshd], [sync]"
        ]
    );
    assert!(errors("gre = 5\n")[0].contains("must be an array of tables"));
    assert!(errors("[[nat]]\n")[0].contains("must be a table"));
    let e = errors(
        "[[vrrp]]\nname=\"v\"\ninterface=\"eth0\"\nvrid=1\naddresses=[\"10.0.0.1/24\"]\nadvert_interval = \"1.5s\"\n",
    );
    assert!(
        e[0].starts_with("site.toml:6:19: invalid duration"),
        "{e:?}"
    );
}

#[test]
fn line_col_counts_characters() {
    assert_eq!(line_col("ab\ncdé\nf", 0), (1, 1));
    assert_eq!(line_col("ab\ncdé\nf", 3), (2, 1));
    assert_eq!(line_col("ab\ncdé\nf", 8), (3, 1));
    assert_eq!(
        line_col("ab\ncdé\nf", 6),
        (2, 3),
        "inside a character counts as that character"
    );
    assert_eq!(line_col("ab", 99), (1, 3));
}

proptest! {
    #[test]
    fn never_panics_on_arbitrary_text(text in ".{0,200}") {
        let _ = parse(Path::new("x.toml"), &text);
    }

    #[test]
    fn never_panics_on_mutated_reference(idx in 0usize..2000, byte in any::<u8>()) {
        let mut bytes = REFERENCE.as_bytes().to_vec();
        let i = idx % bytes.len();
        bytes[i] = byte;
        if let Ok(text) = String::from_utf8(bytes) {
            let _ = parse(Path::new("x.toml"), &text);
        }
    }
}

#[test]
fn a_short_health_interval_with_the_default_timeout_points_at_the_interval() {
    let text = "[[service]]\nname = \"web\"\nlisten = \"198.51.100.10:80\"\n\
                health = { kind = \"tcp\", interval = \"200ms\" }\n\
                backends = [{ address = \"10.0.0.1:80\" }]\n";
    let errs = errors(text);
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(errs[0].starts_with("site.toml:4:"), "{errs:#?}");
    assert!(errs[0].contains("set `timeout` too"), "{errs:#?}");
}

#[test]
fn line_starts_agree_with_line_col() {
    let text = "a = 1\nbé = \"x\"\n\n[[gre]]\nname = 2\n";
    let lines = LineStarts::new(text);
    for offset in 0..=text.len() + 3 {
        assert_eq!(
            lines.line_col(text, offset),
            line_col(text, offset),
            "{offset}"
        );
    }
}

#[test]
fn many_diagnostics_render_fast_and_capped() {
    let mut text = String::new();
    for i in 0..40_000 {
        text.push_str(&format!("bogus{i} = 1\n"));
    }
    let errors = parse(Path::new("m.toml"), &text).unwrap_err();
    let out = errors.to_string();
    assert_eq!(out.lines().count(), MAX_DIAGNOSTICS + 1);
    assert!(
        out.ends_with(&format!("m.toml: … and {} more", 40_000 - MAX_DIAGNOSTICS)),
        "{}",
        out.lines().last().unwrap_or("")
    );
}

/// The issue's example: a range error, a misspelt key and a type error in two sections.
const ISSUE_EXAMPLE: &str = "[nat]\ninside = [\"eth1\"]\noutside = \"eth0\"\naddress = \"198.51.100.1\"\n\
    [[nat.static]]\nproto = \"tcp\"\noutside_port = \"eighty\"\ninside = \"10.0.0.5:80\"\n\
    [[vrrp]]\nname = \"v\"\ninterface = \"eth0\"\nvrid = 300\npriorty = 150\naddresses = [\"10.0.0.1/24\"]\n";

#[test]
fn a_bad_key_hides_no_other_problem_of_its_section_or_file() {
    let errs = errors(ISSUE_EXAMPLE);
    assert_eq!(errs.len(), 3, "{errs:#?}");
    assert!(
        errs[0].starts_with("site.toml:7:16: invalid type: string \"eighty\""),
        "{errs:?}"
    );
    assert_eq!(errs[1], "site.toml:12:8: vrid 300 is out of range 1..=255");
    assert!(
        errs[2].starts_with("site.toml:13:1: unknown key `priorty` (did you mean `priority`?)"),
        "{errs:?}"
    );
}

#[test]
fn a_table_left_without_a_required_key_is_dropped_silently() {
    // `vrid` is mistyped: reported once, not again as "missing field `vrid`".
    let errs = errors(
        "[[vrrp]]\nname = \"v\"\ninterface = \"eth0\"\nvrid = \"one\"\naddresses = [\"10.0.0.1/24\"]\nbogus = 1\n",
    );
    assert_eq!(errs.len(), 2, "{errs:#?}");
    assert!(
        errs[0].starts_with("site.toml:4:8: invalid type"),
        "{errs:?}"
    );
    assert!(
        errs[1].starts_with("site.toml:6:1: unknown key `bogus`"),
        "{errs:?}"
    );
}

#[test]
fn many_bad_keys_in_one_section_are_all_reported_up_to_the_cap() {
    let mut text = String::from("[daemon]\n");
    for i in 0..150 {
        text.push_str(&format!("bogus{i} = 1\n"));
    }
    let out = parse(Path::new("m.toml"), &text).unwrap_err().to_string();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), MAX_DIAGNOSTICS + 1, "{out}");
    assert!(
        lines[0].starts_with("m.toml:2:1: unknown key `bogus0`"),
        "{out}"
    );
    assert!(
        lines[MAX_DIAGNOSTICS].starts_with("m.toml: … and "),
        "{out}"
    );
}

#[test]
fn an_open_sshd_without_permit_lists_is_a_warning() {
    let base =
        "[sshd]\nhost_key = \"/etc/vipgate/host\"\nauthorized_keys = \"/etc/vipgate/keys\"\n";
    let open = format!("{base}listen = \"0.0.0.0:2222\"\n");
    let site = parse(Path::new("site.toml"), &open).expect("a warning, not an error");
    assert_eq!(site.warnings.len(), 1, "{:?}", site.warnings);
    assert!(
        site.warnings[0].starts_with("site.toml:4:10: warning: [sshd] listens on 0.0.0.0:2222"),
        "{:?}",
        site.warnings
    );
    for quiet in [
        format!("{base}listen = \"127.0.0.1:2222\"\n"),
        format!("{base}permit_open = [\"10.0.0.1:80\"]\n"),
        format!("{base}permit_listen = [\"8080\"]\n"),
    ] {
        let site = parse(Path::new("site.toml"), &quiet).expect("valid");
        assert!(site.warnings.is_empty(), "{quiet}: {:?}", site.warnings);
    }
}

#[test]
fn the_dump_of_the_reference_reparses_to_the_same_config() {
    let site = parse(Path::new("reference.toml"), REFERENCE).expect("valid");
    let dumped = crate::check::effective_toml(&site).expect("serializes");
    let again = parse(Path::new("dump.toml"), &dumped).expect("the dump is valid");
    assert_eq!(
        crate::check::effective_toml(&again).expect("serializes"),
        dumped
    );
    assert!(
        dumped.contains("max_half_open_per_source = 256"),
        "{dumped}"
    );
}

#[test]
fn library_enums_keep_the_config_spelling_and_defaults() {
    let text = "[[ssh]]\ndestination = \"u@h\"\nlocal = [\"8080:10.0.0.1:80\"]\n\n\
                [[ssh]]\ndestination = \"v@h\"\nlocal = [\"8081:10.0.0.1:80\"]\n\
                strict_host_key_checking = \"accept-new\"\n";
    let site = parse(Path::new("site.toml"), text).expect("valid");
    // The daemon refuses unknown hosts unless told otherwise, although the library's own
    // default (for one-off `vipgate ssh`) is accept-new.
    assert_eq!(
        site.ssh[0].strict_host_key_checking,
        sshfwd::known_hosts::StrictHostKeyChecking::Yes
    );
    assert_eq!(
        site.ssh[1].strict_host_key_checking,
        sshfwd::known_hosts::StrictHostKeyChecking::AcceptNew
    );
    let dumped = crate::check::effective_toml(&site).expect("serializes");
    assert!(
        dumped.contains("strict_host_key_checking = \"yes\""),
        "{dumped}"
    );
    assert!(
        dumped.contains("strict_host_key_checking = \"accept-new\""),
        "{dumped}"
    );

    let reference = parse(Path::new("reference.toml"), REFERENCE).expect("valid");
    let dumped = crate::check::effective_toml(&reference).expect("serializes");
    for spelled in [
        "scheduler = \"",
        "filtering = \"",
        "action = \"",
        "proto = \"",
    ] {
        assert!(dumped.contains(spelled), "{spelled} missing from {dumped}");
    }
}

/// A scratch folder with `site.toml` and `conf.d/` files, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str, main: &str, included: &[(&str, &str)]) -> Self {
        let dir =
            std::env::temp_dir().join(format!("vipgate-include-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("conf.d")).expect("scratch folder");
        std::fs::write(dir.join("site.toml"), main).expect("main file");
        for (file, text) in included {
            std::fs::write(dir.join("conf.d").join(file), text).expect("included file");
        }
        Scratch(dir)
    }

    fn load(&self) -> Result<SiteConfig, Vec<String>> {
        load(&self.0.join("site.toml")).map_err(|e| {
            e.to_string()
                .replace(&format!("{}/", self.0.display()), "")
                .lines()
                .map(str::to_owned)
                .collect()
        })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const INCLUDE_MAIN: &str = "include = [\"conf.d/*.toml\"]\n\n[daemon]\ncontrol = \"/run/v.sock\"\n";

fn instance(name: &str, vrid: &str) -> String {
    format!(
        "# {name}\n[[vrrp]]\nname = \"{name}\"\ninterface = \"eth0\"\nvrid = {vrid}\naddresses = [\"10.0.0.{vrid}/24\"]\n"
    )
}

#[test]
fn includes_merge_sections_in_name_order() {
    let s = Scratch::new(
        "merge",
        INCLUDE_MAIN,
        &[
            ("b.toml", &instance("second", "2")),
            ("a.toml", &instance("first", "1")),
            ("notes.txt", "not toml"),
        ],
    );
    let site = s.load().expect("valid");
    let names: Vec<&str> = site
        .vrrp
        .iter()
        .map(|v| v.name.get_ref().as_str())
        .collect();
    assert_eq!(names, ["first", "second"]);
    assert_eq!(site.daemon.control.get_ref(), Path::new("/run/v.sock"));
    assert_eq!(site.included.len(), 2);
}

#[test]
fn a_mistake_in_the_second_included_file_points_into_that_file() {
    let s = Scratch::new(
        "mistake",
        INCLUDE_MAIN,
        &[
            ("a.toml", &instance("first", "1")),
            ("b.toml", &instance("second", "0")),
        ],
    );
    let errs = s.load().unwrap_err();
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].starts_with("conf.d/b.toml:5:8: vrid 0 is out of range"),
        "{errs:?}"
    );
    // Across files: the duplicate is reported where it is, naming where the first one is.
    let s = Scratch::new(
        "duplicate",
        INCLUDE_MAIN,
        &[
            ("a.toml", &instance("web", "1")),
            ("b.toml", &instance("web", "2")),
        ],
    );
    let errs = s.load().unwrap_err();
    assert!(
        errs[0].starts_with("conf.d/b.toml:3:8: duplicate vrrp instance name `web`")
            && errs[0].contains("line 3 of ")
            && errs[0].contains("conf.d/a.toml"),
        "{errs:?}"
    );
}

#[test]
fn included_files_hold_sections_only_and_single_tables_once() {
    let s = Scratch::new(
        "bare",
        INCLUDE_MAIN,
        &[("a.toml", "# header missing\nname = \"x\"\n")],
    );
    let errs = s.load().unwrap_err();
    assert!(
        errs[0].starts_with("conf.d/a.toml:2:1: an included file holds [sections] only"),
        "{errs:?}"
    );
    let s = Scratch::new(
        "twice",
        INCLUDE_MAIN,
        &[("a.toml", "[daemon]\ncontrol = \"/run/w.sock\"\n")],
    );
    let errs = s.load().unwrap_err();
    assert!(errs[0].starts_with("conf.d/a.toml:1:"), "{errs:?}");
    let s = Scratch::new(
        "missing",
        "include = [\"conf.d/none.toml\", \"other/*.toml\"]\n[daemon]\n",
        &[],
    );
    let errs = s.load().unwrap_err();
    assert_eq!(
        errs,
        ["site.toml:1:12: include `conf.d/none.toml`: no such file"],
        "a missing file is an error; a pattern matching nothing is not"
    );
    assert_eq!(
        errors("include = \"conf.d\"\n[daemon]\n"),
        [
            "site.toml:1:11: include must be a list of files or patterns: include = [\"/etc/vipgate/conf.d/*.toml\"]"
        ]
    );
}

#[test]
fn a_real_server_endpoint_serves_one_service_or_forward() {
    let text = "[nat]\noutside = \"eth0\"\ninside = [\"eth1\"]\naddress = \"198.51.100.1\"\n\
                [[nat.static]]\nproto = \"tcp\"\noutside_port = 8001\ninside = \"10.0.0.3:80\"\n\n\
                [[service]]\nname = \"web\"\nlisten = \"198.51.100.10:80\"\n\
                backends = [{ address = \"10.0.0.1:80\" }, { address = \"10.0.0.2:80\" }]\n\n\
                [[service]]\nname = \"alt\"\nlisten = \"198.51.100.10:8080\"\n\
                backends = [{ address = \"10.0.0.2:80\" }, { address = \"10.0.0.3:80\" }, \
                { address = \"10.0.0.2:81\" }]\n";
    let errs = errors(text);
    assert_eq!(errs.len(), 2, "{errs:#?}");
    assert!(
        errs[0].starts_with("site.toml:18:25: 10.0.0.2:80 already serves service `web`"),
        "{errs:#?}"
    );
    assert!(
        errs[1].contains("10.0.0.3:80 already serves the [[nat.static]] forward of port 8001"),
        "{errs:#?}"
    );
}

/// A service whose `[service.health]` table holds `lines` (from line 6 on).
fn checked_service(lines: &str) -> String {
    format!(
        "[[service]]\nname = \"web\"\nlisten = \"198.51.100.10:80\"\n\
         backends = [{{ address = \"10.0.0.1:80\" }}]\n[service.health]\n{lines}"
    )
}

#[test]
fn health_check_kinds_point_at_each_mistake() {
    let ok = checked_service("kind = \"http\"\nport = 8080\nexpect = \"status: ok\"\n");
    let site = parse(Path::new("site.toml"), &ok).unwrap();
    let health = lower::service(&site.service[0]).health.unwrap();
    assert_eq!(health.port, Some(8080));
    assert!(
        matches!(&health.kind, natgw::health::CheckKind::Http { expect: Some(e), .. } if e == "status: ok"),
        "{health:?}"
    );

    let agent = checked_service("interval = \"3s\"\nagent_port = 9999\n");
    let site = parse(Path::new("site.toml"), &agent).unwrap();
    let health = lower::service(&site.service[0]).health.unwrap();
    assert_eq!(
        health.agent,
        Some(natgw::health::AgentConfig {
            port: 9999,
            interval: std::time::Duration::from_secs(3)
        }),
        "the agent is asked every interval by default"
    );
    let https = checked_service("kind = \"https\"\nsni = \"web.example\"\nverify = false\n");
    let site = parse(Path::new("site.toml"), &https).unwrap();
    let health = lower::service(&site.service[0]).health.unwrap();
    assert!(
        matches!(&health.kind, natgw::health::CheckKind::Http { tls: Some(t), .. }
            if t.sni.as_deref() == Some("web.example") && !t.verify && t.ca_file.is_none()),
        "{health:?}"
    );

    let cases: &[(&str, &str)] = &[
        ("port = 0\n", "site.toml:6:8: health port must be 1..=65535"),
        (
            "kind = \"smtp\"\n",
            "site.toml:6:8: unknown value `smtp`; expected one of: tcp, http, https",
        ),
        (
            "expect = \"ok\"\n",
            "site.toml:6:10: expect needs an HTTP or UDP check",
        ),
        (
            "kind = \"http\"\nexpect = \"\"\n",
            "site.toml:7:10: expect must be 1 to 1024 bytes long",
        ),
        (
            "kind = \"http\"\nsni = \"web.example\"\n",
            "site.toml:7:7: sni needs kind = \"https\"",
        ),
        (
            "kind = \"https\"\nsni = \"10.0.0.1\"\n",
            "site.toml:7:7: sni \"10.0.0.1\" must be a DNS name",
        ),
        (
            "kind = \"https\"\nca_file = \"/nonexistent/ca.pem\"\n",
            "site.toml:7:11: CA file /nonexistent/ca.pem:",
        ),
        (
            "kind = \"https\"\nverify = false\nca_file = \"/etc/hostname\"\n",
            "site.toml:8:11: ca_file is not used with verify = false",
        ),
        (
            "agent_port = 0\n",
            "site.toml:6:14: agent_port must be 1..=65535",
        ),
        (
            "agent_interval = \"5s\"\n",
            "site.toml:6:18: agent_interval needs agent_port",
        ),
        (
            "timeout = \"1s\"\nagent_port = 9999\nagent_interval = \"500ms\"\n",
            "site.toml:8:18: agent_interval is shorter than the health timeout (1s)",
        ),
    ];
    for (lines, want) in cases {
        let errs = errors(&checked_service(lines));
        assert!(
            errs.iter().any(|e| e.starts_with(want)),
            "{lines:?}: want {want:?} in {errs:#?}"
        );
    }
}

const HTTP_SITE: &str = r#"[[http]]
name = "www"
listen = "198.51.100.10:80"
trusted_proxies = ["10.0.0.0/8"]
max_body_bytes = 1000
header_timeout = "5s"
tunnel_timeout = "10m"
drain_timeout = "30s"

[[http.route]]
name = "api"
host = ["*.example.com"]
path_prefix = ["/api/"]
method = ["GET", "POST"]
header = { "X-Canary" = "1", "X-Debug" = "*" }
pool = "api"
strip_prefix = "/api"
set_request_headers = { "X-Env" = "prod" }
del_request_headers = ["X-Debug"]
set_response_headers = { "Strict-Transport-Security" = "max-age=63072000" }
del_response_headers = ["Server"]

[[http.route]]
name = "old"
path = ["/old"]
redirect = { status = 301, prefix = "https://new.example.com" }

[[http.route]]
name = "default"
pool = "web"

[[http.pool]]
name = "web"
scheduler = "wrr"
backends = [{ address = "10.0.0.1:8080", weight = 2 }, { address = "10.0.0.2:8080" }]

[[http.pool]]
name = "api"
backends = [{ address = "10.0.0.3:8080" }]
cookie = { name = "SRV" }
"#;

#[test]
fn an_http_section_lowers_to_the_gateway_config() {
    let site = parse(Path::new("site.toml"), HTTP_SITE).expect("valid");
    let gw = site.http[0].lower();
    assert_eq!(gw.listen.to_string(), "198.51.100.10:80");
    assert_eq!(gw.routes.len(), 3);
    assert_eq!(gw.routes[0].when.hosts.len(), 1);
    assert_eq!(gw.routes[0].when.methods.len(), 2);
    assert_eq!(gw.routes[0].when.headers.len(), 2);
    assert!(gw.routes[0].when.headers.iter().any(|h| h.value.is_none()));
    assert_eq!(gw.routes[0].rewrite.set_request.len(), 1);
    assert_eq!(gw.routes[0].rewrite.del_request.len(), 1);
    assert_eq!(gw.routes[0].rewrite.set_response.len(), 1);
    assert_eq!(gw.routes[0].rewrite.del_response.len(), 1);
    assert_eq!(
        gw.routes[0].action,
        httpgw::route::Action::Forward {
            pool: 1,
            strip_prefix: Some("/api".into()),
            canary: None,
        }
    );
    assert!(matches!(
        gw.routes[1].action,
        httpgw::route::Action::Redirect { .. }
    ));
    assert_eq!(gw.pools[0].balance.scheduler, balance::SchedulerKind::Wrr);
    assert_eq!(gw.pools[0].balance.backends[0].weight, 2);
    assert_eq!(gw.pools[1].balance.scheduler, balance::SchedulerKind::Rr);
    assert_eq!(
        gw.pools[1].cookie,
        Some(httpgw::StickyCookie {
            name: "SRV".into(),
            nocache: true,
            mode: httpgw::CookieMode::Insert,
        })
    );
    assert_eq!(gw.limits.max_body_bytes, 1000);
    assert_eq!(gw.limits.header_timeout, std::time::Duration::from_secs(5));
    assert_eq!(
        gw.limits.tunnel_timeout,
        std::time::Duration::from_secs(600)
    );
    assert_eq!(gw.limits.drain_timeout, std::time::Duration::from_secs(30));
    assert_eq!(gw.forwarding.trusted_proxies.len(), 1);
    httpgw::Gateway::new(&gw).expect("the gateway takes what check accepts");
}

#[test]
fn http_mistakes_point_at_their_place() {
    let text = HTTP_SITE
        .replace("\"*.example.com\"", "\"*.exa mple.com\"")
        .replace("path_prefix = [\"/api/\"]", "path_prefix = [\"api/\"]")
        .replace("\"GET\", \"POST\"", "\"GET\", \"post\"")
        .replace("pool = \"api\"", "pool = \"apii\"")
        .replace("status = 301", "status = 200")
        .replace("max_body_bytes = 1000", "max_body_bytes = 2000000000")
        .replace("header_timeout = \"5s\"", "header_timeout = \"10ms\"")
        .replace("drain_timeout = \"30s\"", "drain_timeout = \"2h\"")
        .replace("name = \"SRV\"", "name = \"S R V\"")
        .replace("[\"X-Debug\"]", "[\"Connection\"]")
        .replace("\"prod\"", "\"a\\r\\nX-Injected: 1\"")
        .replace(
            "{ address = \"10.0.0.2:8080\" }",
            "{ address = \"10.0.0.1:8080\" }",
        );
    let errs = errors(&text);
    let at = |needle: &str, col: usize, message: &str| {
        let line = text.lines().position(|l| l.contains(needle)).unwrap() + 1;
        let prefix = format!("site.toml:{line}:{col}: ");
        assert!(
            errs.iter()
                .any(|e| e.starts_with(&prefix) && e.contains(message)),
            "{prefix}{message} not in {errs:#?}"
        );
    };
    at(
        "max_body_bytes",
        18,
        "`max_body_bytes` must be between 0 and",
    );
    at(
        "header_timeout",
        18,
        "`header_timeout` must be between 100ms and 1h",
    );
    at(
        "drain_timeout",
        17,
        "`drain_timeout` must be between 100ms and 1h",
    );
    at("exa mple", 9, "bad host pattern");
    at("path_prefix", 16, "bad path \"api/\"");
    at("\"post\"", 18, "upper-case HTTP method");
    at("pool = \"apii\"", 8, "did you mean `api`?");
    at("status = 200", 23, "redirect status 200");
    at("S R V", 19, "bad cookie name");
    at(
        "del_request_headers",
        24,
        "cannot be set, added or deleted by a rule",
    );
    at("set_request_headers", 35, "bad header value");
    at(
        "weight = 2 }, { address = \"10.0.0.1",
        68,
        "duplicate backend",
    );
    assert_eq!(errs.len(), 12, "{errs:#?}");
}

/// `HTTP_SITE` with a route before the default one: `lines` after its name.
fn http_site_with_route(lines: &str) -> String {
    HTTP_SITE.replace(
        "[[http.route]]\nname = \"default\"",
        &format!("[[http.route]]\nname = \"extra\"\npool = \"web\"\n{lines}\n[[http.route]]\nname = \"default\""),
    )
}

#[test]
fn path_regexes_and_added_headers_lower_to_the_gateway_config() {
    let text = http_site_with_route(
        r#"path_regex = ["^/v[0-9]+/", '\.php$']
path = ["/exact"]
add_request_headers = { "X-Trace" = ["1.1 a", "1.1 b"], "X-Tag" = "a" }
add_response_headers = { "Link" = "</a.css>; rel=preload" }
"#,
    );
    let site = parse(Path::new("site.toml"), &text).expect("valid");
    let gw = site.http[0].lower();
    let extra = &gw.routes[2];
    assert_eq!(extra.name, "extra");
    let regexes: Vec<&str> = extra
        .when
        .paths
        .iter()
        .filter_map(|p| match p {
            httpgw::route::PathPattern::Regex(r) => Some(r.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(regexes, ["^/v[0-9]+/", r"\.php$"]);
    assert_eq!(extra.when.paths.len(), 3);
    let added: Vec<(&str, &str)> = extra
        .rewrite
        .add_request
        .iter()
        .map(|(n, v)| (n.as_str(), v.to_str().unwrap()))
        .collect();
    // Names in table order (sorted), a name's values in array order.
    assert_eq!(
        added,
        [("x-tag", "a"), ("x-trace", "1.1 a"), ("x-trace", "1.1 b")]
    );
    assert_eq!(extra.rewrite.add_response.len(), 1);
    httpgw::Gateway::new(&gw).expect("the gateway takes what check accepts");
}

#[test]
fn path_regex_and_add_header_mistakes_point_at_their_place() {
    let many = vec!["\"v\""; 33].join(", ");
    let text = http_site_with_route(&format!(
        r#"path_regex = ["^/ok", "^/v(", '(\w{{100}}){{100}}', "/{long}"]
add_request_headers = {{ "Connection" = "x", "X-A" = ["ok", "a\r\nb"] }}
add_response_headers = {{ "X-Many" = [{many}] }}
"#,
        long = "a".repeat(1100)
    ));
    let errs = errors(&text);
    let line = |needle: &str| text.lines().position(|l| l.contains(needle)).unwrap() + 1;
    let want = [
        format!(
            "site.toml:{}:23: bad path regex \"^/v(\": unclosed group",
            line("path_regex")
        ),
        format!(
            "site.toml:{}:31: bad path regex \"(\\\\w{{100}}){{100}}\": its compiled program would exceed",
            line("path_regex")
        ),
        format!("site.toml:{}:49: bad path regex \"/aaa", line("path_regex")),
        format!(
            "site.toml:{}:40: \"Connection\" cannot be set, added or deleted by a rule",
            line("add_request_headers")
        ),
        format!(
            "site.toml:{}:53: bad header value \"a\\r\\nb\"",
            line("add_request_headers")
        ),
        format!(
            "site.toml:{}:8: `add_response_headers` adds more than 32 fields",
            line("name = \"extra\"")
        ),
    ];
    for w in &want {
        assert!(
            errs.iter().any(|e| e.starts_with(w.as_str())),
            "{w} not in {errs:#?}"
        );
    }
    assert!(
        errs.iter().any(|e| e.contains("longer than 1024 bytes")),
        "{errs:#?}"
    );
    assert_eq!(errs.len(), want.len(), "{errs:#?}");

    let errs = errors(&http_site_with_route(
        r#"add_response_headers = { "X-A" = 1 }"#,
    ));
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(
        errs[0].contains("expected a header value (a string) or an array of header values"),
        "{errs:#?}"
    );
    let regexes = vec!["\"^/x\""; 33].join(", ");
    let errs = errors(&http_site_with_route(&format!("path_regex = [{regexes}]")));
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(
        errs[0].contains("`path_regex` has more than 32 entries"),
        "{errs:#?}"
    );
}

#[test]
fn a_prefix_cookie_lowers_and_its_mistakes_point_at_their_place() {
    let prefix = HTTP_SITE.replace(
        "cookie = { name = \"SRV\" }",
        "cookie = { name = \"JSESSIONID\", mode = \"prefix\" }",
    );
    let site = parse(Path::new("site.toml"), &prefix).expect("valid");
    let gw = site.http[0].lower();
    assert_eq!(
        gw.pools[1].cookie,
        Some(httpgw::StickyCookie {
            name: "JSESSIONID".into(),
            nocache: false,
            mode: httpgw::CookieMode::Prefix,
        })
    );
    httpgw::Gateway::new(&gw).expect("the gateway takes what check accepts");
    let text = HTTP_SITE.replace(
        "cookie = { name = \"SRV\" }",
        "cookie = { name = \"JSESSIONID\", mode = \"prefix\", nocache = true }",
    );
    let errs = errors(&text);
    let line = text.lines().position(|l| l.contains("JSESSIONID")).unwrap() + 1;
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(
        errs[0].starts_with(&format!("site.toml:{line}:60: "))
            && errs[0].contains("nocache applies to insert mode only"),
        "{errs:#?}"
    );
    let text = HTTP_SITE.replace(
        "cookie = { name = \"SRV\" }",
        "cookie = { name = \"SRV\", mode = \"rewrite\" }",
    );
    let errs = errors(&text);
    let line = text.lines().position(|l| l.contains("rewrite")).unwrap() + 1;
    assert!(
        errs.iter()
            .any(|e| e.starts_with(&format!("site.toml:{line}:"))
                && e.contains("insert")
                && e.contains("prefix")),
        "{errs:#?}"
    );
}

#[test]
fn a_pool_with_tls_lowers_and_its_mistakes_point_at_their_place() {
    let with = |tls: &str| {
        HTTP_SITE.replace(
            "cookie = { name = \"SRV\" }",
            &format!("cookie = {{ name = \"SRV\" }}\ntls = {tls}"),
        )
    };
    let text = with("{ sni = \"app.internal\" }");
    let site = parse(Path::new("site.toml"), &text).expect("valid");
    assert!(site.warnings.is_empty(), "{:?}", site.warnings);
    assert_eq!(
        site.http[0].lower().pools[1].tls,
        Some(natgw::health::TlsCheck {
            sni: Some("app.internal".into()),
            verify: true,
            ca_file: None,
        })
    );
    // verify = false works, warned about at its place.
    let text = with("{ verify = false }");
    let line = text.lines().position(|l| l.starts_with("tls =")).unwrap() + 1;
    let site = parse(Path::new("site.toml"), &text).expect("a warning, not an error");
    assert_eq!(site.warnings.len(), 1, "{:?}", site.warnings);
    assert!(
        site.warnings[0].starts_with(&format!(
            "site.toml:{line}:18: warning: pool `api`: verify = false"
        )),
        "{:?}",
        site.warnings
    );
    let text = with("{ sni = \"not a name\", ca_file = \"/nonexistent/ca.pem\" }");
    let errs = errors(&text);
    assert_eq!(errs.len(), 2, "{errs:#?}");
    assert!(
        errs[0].starts_with(&format!(
            "site.toml:{line}:15: sni \"not a name\" must be a DNS name"
        )),
        "{errs:#?}"
    );
    assert!(
        errs[1].starts_with(&format!("site.toml:{line}:39: CA file /nonexistent/ca.pem")),
        "{errs:#?}"
    );
    let errs = errors(&with("{ verify = false, ca_file = \"/etc/hostname\" }"));
    assert!(
        errs.iter()
            .any(|e| e.contains("ca_file is not used with verify = false")),
        "{errs:#?}"
    );
}

#[test]
fn an_http_route_needs_one_action_and_known_keys() {
    let errs = errors(
        "[[http]]\nname = \"w\"\nlisten = \"127.0.0.1:80\"\n[[http.route]]\nname = \"r\"\n[[http.route]]\nname = \"s\"\npool = \"p\"\nredirect = { location = \"/x\" }\n[[http.route]]\nname = \"t\"\nredirect = { status = 301 }\n[[http.pool]]\nname = \"p\"\n",
    );
    assert!(
        errs.iter()
            .any(|e| e.starts_with("site.toml:5:8: route `r` needs exactly one")),
        "{errs:#?}"
    );
    assert!(
        errs.iter()
            .any(|e| e.starts_with("site.toml:7:8: route `s` needs exactly one")),
        "{errs:#?}"
    );
    assert!(
        errs.iter()
            .any(|e| e.starts_with("site.toml:12:12: a redirect has either")),
        "{errs:#?}"
    );
    assert!(
        errs.iter()
            .any(|e| e.starts_with("site.toml:14:8: pool `p` has no backends")),
        "{errs:#?}"
    );
    let errs = errors(
        "[[http]]\nname = \"w\"\nlisten = \"127.0.0.1:80\"\n[[http.route]]\nname = \"r\"\nhots = [\"a\"]\n",
    );
    assert_eq!(
        errs[0],
        "site.toml:6:1: unknown key `hots` (did you mean `host`?); valid keys here: name, host, path, path_prefix, path_regex, method, header, pool, strip_prefix, canary, redirect, sni, set_request_headers, del_request_headers, add_request_headers, set_response_headers, del_response_headers, add_response_headers"
    );
}

/// A self-signed certificate for `names` and its key, written to `dir` as `NAME.pem` and
/// `NAME.key` (mode `key_mode`).
fn cert_files(dir: &Path, name: &str, names: &[&str], key_mode: u32) -> (String, String) {
    use std::os::unix::fs::PermissionsExt as _;
    let names = names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>();
    let made = rcgen::generate_simple_self_signed(names).expect("rcgen");
    let cert = dir.join(format!("{name}.pem"));
    let key = dir.join(format!("{name}.key"));
    std::fs::write(&cert, made.cert.pem()).expect("write cert");
    std::fs::write(&key, made.signing_key.serialize_pem()).expect("write key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(key_mode)).expect("chmod");
    (cert.display().to_string(), key.display().to_string())
}

#[test]
fn tls_certificates_are_checked_at_their_place() {
    let dir = std::env::temp_dir().join(format!("vipgate-tlscheck-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (a, a_key) = cert_files(&dir, "a", &["a.example.com", "*.a.example.com"], 0o600);
    let (b, b_key) = cert_files(&dir, "b", &["b.example.com"], 0o640);
    let (open, open_key) = cert_files(&dir, "open", &["o.example.com"], 0o644);
    let (nameless, nameless_key) = cert_files(&dir, "nameless", &[], 0o600);
    let garbage = dir.join("garbage.pem");
    std::fs::write(
        &garbage,
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .expect("write");
    let missing = dir.join("missing.pem").display().to_string();
    let garbage = garbage.display().to_string();
    let site = |certs: &[(&str, &str)], extra: &str| {
        let list: Vec<String> = certs
            .iter()
            .map(|(c, k)| format!("  {{ cert_file = \"{c}\", key_file = \"{k}\" }},\n"))
            .collect();
        format!(
            "[[http]]\nname = \"w\"\nlisten = \"127.0.0.1:443\"\ntls = {{ {extra}certs = [\n{}] }}\n[[http.route]]\nname = \"r\"\nsni = [\"*.a.example.com\"]\npool = \"p\"\n[[http.pool]]\nname = \"p\"\nbackends = [{{ address = \"10.0.0.1:80\" }}]\n",
            list.concat()
        )
    };

    // Good: a default certificate without names, one per name; group-readable key.
    let good = site(
        &[(&nameless, &nameless_key), (&a, &a_key), (&b, &b_key)],
        "",
    );
    assert_eq!(errors(&good), Vec::<String>::new());
    let parsed = parse(Path::new("site.toml"), &good).expect("valid");
    let gw = parsed.http[0].lower();
    let tls = gw.tls.as_ref().expect("tls");
    assert_eq!(tls.certs.len(), 3);
    assert_eq!(
        tls.handshake_timeout,
        httpgw::TlsConfig::DEFAULT_HANDSHAKE_TIMEOUT
    );
    assert_eq!(gw.routes[0].when.sni.len(), 1);
    httpgw::Gateway::new(&gw).expect("the gateway takes what check accepts");

    let bad = site(
        &[
            (&a, &b_key),
            (&missing, &a_key),
            (&open, &open_key),
            (&garbage, &a_key),
            (&nameless, &nameless_key),
        ],
        "handshake_timeout = \"1ms\", ",
    );
    let errs = errors(&bad);
    let at = |line: usize, col: usize, message: &str| {
        let prefix = format!("site.toml:{line}:{col}: ");
        assert!(
            errs.iter()
                .any(|e| e.starts_with(&prefix) && e.contains(message)),
            "{prefix}{message} not in {errs:#?}"
        );
    };
    at(4, 29, "`handshake_timeout` must be between 100ms and 1h");
    let key_col = |c: &str| c.chars().count() + 32;
    at(5, key_col(&a), "is not the key of the certificate in");
    at(6, 17, "No such file or directory");
    at(7, key_col(&open), "has mode 0644");
    at(8, 17, "the certificate does not parse");
    at(9, 17, "has no DNS name in its subjectAltName");
    assert_eq!(errs.len(), 6, "{errs:#?}");

    // sni on a listener without TLS would never match.
    let plain = HTTP_SITE.replace(
        "name = \"old\"\n",
        "name = \"old\"\nsni = [\"a.example.com\"]\n",
    );
    let errs = errors(&plain);
    assert!(
        errs.iter()
            .any(|e| e.starts_with("site.toml:25:8: `sni` matches a TLS server name")),
        "{errs:#?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn http2_keys_are_checked_at_their_place() {
    let dir = std::env::temp_dir().join(format!("vipgate-h2check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (a, a_key) = cert_files(&dir, "a", &["a.example.com"], 0o600);
    let site = |alpn: &str, streams: &str| {
        format!(
            "[[http]]\nname = \"w\"\nlisten = \"127.0.0.1:443\"\n{streams}tls = {{ {alpn}certs = [{{ cert_file = \"{a}\", key_file = \"{a_key}\" }}] }}\n[[http.route]]\nname = \"r\"\npool = \"p\"\n[[http.pool]]\nname = \"p\"\nbackends = [{{ address = \"10.0.0.1:80\" }}]\n"
        )
    };
    let lowered = |text: &str| {
        assert_eq!(errors(text), Vec::<String>::new());
        let gw = parse(Path::new("site.toml"), text).expect("valid").http[0].lower();
        httpgw::Gateway::new(&gw).expect("the gateway takes what check accepts");
        gw
    };
    // Defaults: h2 then http/1.1, 100 streams.
    let gw = lowered(&site("", ""));
    assert_eq!(
        gw.tls.expect("tls").alpn,
        httpgw::TlsConfig::DEFAULT_ALPN.to_vec()
    );
    assert_eq!(gw.limits.max_streams, 100);
    let gw = lowered(&site("alpn = [\"http/1.1\"], ", "max_streams = 1000\n"));
    assert_eq!(gw.tls.expect("tls").alpn, vec![httpgw::Alpn::Http11]);
    assert_eq!(gw.limits.max_streams, 1000);

    let errs = errors(&site(
        "alpn = [\"h2\", \"http/1.0\", \"h2\"], ",
        "max_streams = 0\n",
    ));
    let at = |errs: &[String], line: usize, col: usize, message: &str| {
        let prefix = format!("site.toml:{line}:{col}: ");
        assert!(
            errs.iter()
                .any(|e| e.starts_with(&prefix) && e.contains(message)),
            "{prefix}{message} not in {errs:#?}"
        );
    };
    at(
        &errs,
        4,
        15,
        "`max_streams` must be between 1 and 1000, not 0",
    );
    at(&errs, 5, 23, "unknown ALPN protocol \"http/1.0\"");
    at(&errs, 5, 23, "did you mean `http/1.1`");
    at(&errs, 5, 35, "`alpn` lists \"h2\" twice");
    assert_eq!(errs.len(), 3, "{errs:#?}");
    let errs = errors(&site("alpn = [], ", "max_streams = 1001\n"));
    at(&errs, 4, 15, "not 1001");
    at(&errs, 5, 16, "`alpn` needs at least one");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `[[http.pool]]` takes a `[[service]]`'s `health` table (same keys, same defaults, same
/// checks), `eject` and `slow_start`, and points at each mistake.
#[test]
fn http_pool_health_eject_and_slow_start_are_read_and_checked_with_their_position() {
    let checked = HTTP_SITE.replace(
        "cookie = { name = \"SRV\" }",
        "cookie = { name = \"SRV\" }\nhealth = { kind = \"http\", path = \"/up\", expect = \"ok\", interval = \"3s\", fall = 3 }\neject = { consecutive_errors = 7 }\nslow_start = \"20s\"",
    );
    let site = parse(Path::new("site.toml"), &checked).expect("valid");
    let gw = site.http[0].lower();
    let api = &gw.pools[1];
    let health = api.health.as_ref().expect("checked");
    assert_eq!(
        (health.interval, health.timeout, health.rise, health.fall),
        (
            std::time::Duration::from_secs(3),
            std::time::Duration::from_secs(1),
            2,
            3
        )
    );
    assert!(
        matches!(&health.kind, natgw::health::CheckKind::Http { path, expect: Some(e), .. } if path == "/up" && e == "ok")
    );
    assert_eq!(
        api.eject,
        Some(httpgw::health::EjectConfig {
            consecutive_errors: 7,
            duration: std::time::Duration::from_secs(30),
        })
    );
    assert_eq!(
        api.balance.slow_start,
        Some(std::time::Duration::from_secs(20))
    );
    assert_eq!(
        (gw.pools[0].health.as_ref(), gw.pools[0].eject),
        (None, None)
    );
    httpgw::Gateway::new(&gw).expect("the gateway takes what check accepts");

    let bad = HTTP_SITE.replace(
        "cookie = { name = \"SRV\" }",
        "cookie = { name = \"SRV\" }\nhealth = { kind = \"udp\", path = \"up\", rise = 0, agent_port = 9000 }\neject = { consecutive_errors = 0, duration = \"2h\" }\nslow_start = \"0s\"",
    );
    let errs = errors(&bad);
    let at = |needle: &str, col: usize, message: &str| {
        let line = bad.lines().position(|l| l.contains(needle)).unwrap() + 1;
        let prefix = format!("site.toml:{line}:{col}: ");
        assert!(
            errs.iter()
                .any(|e| e.starts_with(&prefix) && e.contains(message)),
            "{prefix}{message} not in {errs:#?}"
        );
    };
    at("rise = 0", 46, "rise must be at least 1");
    at("agent_port = 9000", 62, "an HTTP pool asks no agent");
    // The pool's name, not the route's of the same name.
    let pool_line = bad
        .lines()
        .enumerate()
        .filter(|(_, l)| *l == "name = \"api\"")
        .map(|(i, _)| i + 1)
        .max()
        .unwrap();
    assert!(
        errs.iter().any(|e| e.starts_with(&format!(
            "site.toml:{pool_line}:8: pool `api`: an HTTP pool"
        )) && e.contains("not \"udp\"")),
        "{errs:#?}"
    );
    at(
        "consecutive_errors = 0",
        32,
        "eject consecutive_errors must be 1..=10000",
    );
    at(
        "duration = \"2h\"",
        46,
        "eject duration must be between 1s and 1h",
    );
    at(
        "slow_start = \"0s\"",
        14,
        "slow_start must be between 1ms and 1h",
    );
    assert_eq!(errs.len(), 6, "{errs:#?}");
    // The [[service]] checks' own messages, at the same places.
    let bad = HTTP_SITE.replace(
        "cookie = { name = \"SRV\" }",
        "cookie = { name = \"SRV\" }\nhealth = { kind = \"http\", path = \"up\" }",
    );
    let errs = errors(&bad);
    let line = bad
        .lines()
        .position(|l| l.contains("path = \"up\""))
        .unwrap()
        + 1;
    assert!(
        errs.len() == 1
            && errs[0].starts_with(&format!(
                "site.toml:{line}:34: health path \"up\" must start with /"
            )),
        "{errs:#?}"
    );
}

/// `retries` (per pool, default 3, 0 to 10) and `connect_timeout` (per listener, default
/// 5s) are read, and their mistakes pointed at.
#[test]
fn http_retries_and_connect_timeout_are_read_and_checked_with_their_position() {
    let site = parse(Path::new("site.toml"), HTTP_SITE).expect("valid");
    let gw = site.http[0].lower();
    assert_eq!(gw.pools[0].retries, httpgw::PoolSpec::DEFAULT_RETRIES);
    assert_eq!(gw.limits.connect_timeout, std::time::Duration::from_secs(5));

    let set = HTTP_SITE
        .replace(
            "cookie = { name = \"SRV\" }",
            "cookie = { name = \"SRV\" }\nretries = 0",
        )
        .replace(
            "drain_timeout = \"30s\"",
            "drain_timeout = \"30s\"\nconnect_timeout = \"250ms\"",
        );
    let site = parse(Path::new("site.toml"), &set).expect("valid");
    let gw = site.http[0].lower();
    assert_eq!((gw.pools[0].retries, gw.pools[1].retries), (3, 0));
    assert_eq!(
        gw.limits.connect_timeout,
        std::time::Duration::from_millis(250)
    );
    httpgw::Gateway::new(&gw).expect("the gateway takes what check accepts");

    let bad = HTTP_SITE
        .replace(
            "cookie = { name = \"SRV\" }",
            "cookie = { name = \"SRV\" }\nretries = 11",
        )
        .replace(
            "drain_timeout = \"30s\"",
            "drain_timeout = \"30s\"\nconnect_timeout = \"0s\"",
        );
    let errs = errors(&bad);
    let line = |needle: &str| bad.lines().position(|l| l.contains(needle)).unwrap() + 1;
    let expected = [
        format!(
            "site.toml:{}:11: `retries` must be between 0 and 10, not 11",
            line("retries = 11")
        ),
        format!(
            "site.toml:{}:19: `connect_timeout` must be between 100ms and 1h",
            line("connect_timeout")
        ),
    ];
    for e in &expected {
        assert!(
            errs.iter().any(|got| got.starts_with(e.as_str())),
            "{e} not in {errs:#?}"
        );
    }
    assert_eq!(errs.len(), 2, "{errs:#?}");
}

/// `canary = { pool, percent, by }` on a route is read, and its mistakes pointed at.
#[test]
fn http_canary_is_read_and_checked_with_its_position() {
    use httpgw::route::{Action, Canary, CanaryKey};
    let set = HTTP_SITE.replace(
        "name = \"default\"\npool = \"web\"",
        "name = \"default\"\npool = \"web\"\ncanary = { pool = \"api\", percent = 10 }",
    );
    let gw = parse(Path::new("site.toml"), &set).expect("valid").http[0].lower();
    assert!(matches!(
        gw.routes[2].action,
        Action::Forward {
            canary: Some(Canary {
                pool: 1,
                percent: 10,
                by: CanaryKey::Source
            }),
            ..
        }
    ));
    httpgw::Gateway::new(&gw).expect("the gateway takes what check accepts");

    let bad = HTTP_SITE
        .replace(
            "name = \"default\"\npool = \"web\"",
            "name = \"default\"\npool = \"web\"\ncanary = { pool = \"apj\", percent = 10 }",
        )
        .replace(
            "path_prefix = [\"/api/\"]",
            "path_prefix = [\"/api/\"]\ncanary = { pool = \"web\", percent = 101, by = \"cookie\" }",
        )
        .replace(
            "redirect = { status = 301",
            "canary = { pool = \"web\", percent = 5, by = \"client\" }\nredirect = { status = 301",
        );
    let errs = errors(&bad);
    let line = |needle: &str| bad.lines().position(|l| l.contains(needle)).unwrap() + 1;
    let expected = [
        format!(
            "site.toml:{}:19: route `default` sends a canary to pool `apj`, which is not defined (did you mean `api`?)",
            line("\"apj\"")
        ),
        format!(
            "site.toml:{}:36: canary percent must be between 0 and 100, not 101",
            line("percent = 101")
        ),
        format!(
            "site.toml:{}:46: canary `by` is \"source\" or \"request\", not \"cookie\"",
            line("percent = 101")
        ),
        format!(
            "site.toml:{}:10: canary applies to a route with a pool, not to a redirect",
            line("by = \"client\"")
        ),
    ];
    for e in &expected {
        assert!(
            errs.iter().any(|got| got.starts_with(e.as_str())),
            "{e} not in {errs:#?}"
        );
    }
    assert_eq!(errs.len(), 4, "{errs:#?}");
}

/// `via` (per listener, a token pseudonym) and `proxy_protocol = "v2"` (per pool, not with
/// `tls`) are read, and their mistakes pointed at.
#[test]
fn http_via_and_proxy_protocol_are_read_and_checked_with_their_position() {
    let gw = parse(Path::new("site.toml"), HTTP_SITE)
        .expect("valid")
        .http[0]
        .lower();
    assert_eq!(gw.forwarding.via, None);
    assert!(gw.pools.iter().all(|p| !p.proxy_protocol));

    let set = HTTP_SITE
        .replace(
            "drain_timeout = \"30s\"",
            "drain_timeout = \"30s\"\nvia = \"gw1\"",
        )
        .replace(
            "scheduler = \"wrr\"",
            "scheduler = \"wrr\"\nproxy_protocol = \"v2\"",
        );
    let gw = parse(Path::new("site.toml"), &set).expect("valid").http[0].lower();
    assert_eq!(gw.forwarding.via.as_deref(), Some("gw1"));
    assert_eq!(
        gw.pools
            .iter()
            .map(|p| p.proxy_protocol)
            .collect::<Vec<_>>(),
        [true, false]
    );
    httpgw::Gateway::new(&gw).expect("the gateway takes what check accepts");

    let bad = HTTP_SITE
        .replace(
            "drain_timeout = \"30s\"",
            "drain_timeout = \"30s\"\nvia = \"gw 1\"",
        )
        .replace(
            "scheduler = \"wrr\"",
            "scheduler = \"wrr\"\nproxy_protocol = \"v1\"",
        )
        .replace(
            "backends = [{ address = \"10.0.0.3:8080\" }]",
            "backends = [{ address = \"10.0.0.3:8080\" }]\nproxy_protocol = \"v2\"\ntls = { verify = false }",
        );
    let errs = errors(&bad);
    let line = |needle: &str| bad.lines().position(|l| l.contains(needle)).unwrap() + 1;
    let expected = [
        format!(
            "site.toml:{}:7: via \"gw 1\": a pseudonym is",
            line("via = ")
        ),
        format!(
            "site.toml:{}:18: proxy_protocol \"v1\": the one version sent is \"v2\"",
            line("proxy_protocol = \"v1\"")
        ),
        format!(
            "site.toml:{}:7: `tls` and `proxy_protocol` on one pool are not supported yet",
            line("tls = { verify")
        ),
    ];
    for e in &expected {
        assert!(
            errs.iter().any(|got| got.starts_with(e.as_str())),
            "{e} not in {errs:#?}"
        );
    }
    assert_eq!(errs.len(), 3, "{errs:#?}");
}

/// VRRP `track_services` names an HTTP pool as `listener/pool`, checked like a service name.
#[test]
fn track_services_names_an_http_pool_as_listener_slash_pool() {
    let with = |tracked: &str| {
        format!(
            "{}\n{HTTP_SITE}",
            REFERENCE.replace(
                "track_services = [\"web\"]",
                &format!("track_services = [\"web\", \"{tracked}\"]")
            )
        )
    };
    assert_eq!(errors(&with("www/api")), Vec::<String>::new());
    let text = with("www/apii");
    let errs = errors(&text);
    let line = text.lines().position(|l| l.contains("www/apii")).unwrap() + 1;
    assert!(
        errs.len() == 1
            && errs[0].starts_with(&format!("site.toml:{line}:"))
            && errs[0].contains("no [[service]] nor HTTP pool (`listener/pool`)")
            && errs[0].contains("did you mean `www/api`"),
        "{errs:#?}"
    );
}
