//! Hostile input: property tests (proptest) that every parser of outside text or bytes returns
//! a value or an error and never panics: tracefs `format` files, /proc/net/tcp, /proc/PID/cgroup
//! and cgroup paths, the configuration file, OTLP headers and endpoints from flags and the
//! environment, and the TCP and process event decoders fed from the ring buffers.

use proptest::prelude::*;

use crate::{
    export::otlp::ParserInputs,
    kernel,
    metadata::cgroup,
    probe::{listeners, sched, tcp},
    snapshot::Snapshot,
};

/// One `field:` line of a tracefs format file with arbitrary parts.
fn format_line() -> impl Strategy<Value = String> {
    (
        "[a-z_ \\[\\]0-9*]{0,24}",
        prop_oneof![
            Just(String::new()),
            any::<i64>().prop_map(|n| n.to_string()),
            "[0-9a-z-]{0,12}"
        ],
        prop_oneof![any::<u32>().prop_map(|n| n.to_string()), "[0-9x-]{0,6}"],
        prop_oneof![Just("0".to_owned()), Just("1".to_owned()), "[0-9a-z]{0,3}"],
        "[ \t;:]{0,3}",
    )
        .prop_map(|(decl, off, size, signed, junk)| {
            format!("\tfield:{decl};\toffset:{off};{junk}\tsize:{size};\tsigned:{signed};")
        })
}

/// A /proc/net/tcp line with arbitrary (often malformed) columns.
fn proc_net_tcp_line() -> impl Strategy<Value = String> {
    (
        "[0-9: ]{0,6}",
        "[0-9A-Fa-fx:]{0,40}",
        "[0-9A-Fa-fx:]{0,40}",
        "[0-9A-Fa-f]{0,3}",
        "[0-9A-Fa-f: ]{0,40}",
        any::<u64>(),
        "[ 0-9a-z]{0,20}",
    )
        .prop_map(|(sl, local, rem, st, mid, inode, tail)| {
            format!("{sl} {local} {rem} {st} {mid} 0 0 {inode} {tail}")
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn tracefs_format_never_panics(
        lines in prop::collection::vec(prop_oneof![format_line(), ".{0,80}"], 0..12),
        name in "[a-z_]{0,12}",
        size in any::<u32>(),
    ) {
        let text = lines.join("\n");
        if let Ok(f) = kernel::parse_format(&text) {
            let _ = f.offset(&name, size);
            let _ = tcp::offsets(&f);
        }
    }

    #[test]
    fn proc_net_tcp_never_panics(
        lines in prop::collection::vec(prop_oneof![proc_net_tcp_line(), ".{0,120}"], 0..10),
        link in ".{0,40}",
    ) {
        let text = format!("  sl  local_address rem_address   st\n{}", lines.join("\n"));
        let _ = listeners::parse_proc_net_tcp(&text);
        let _ = listeners::socket_inode(&link);
        let _ = listeners::socket_inode(&format!("socket:[{link}]"));
    }

    #[test]
    fn cgroup_parsers_never_panic(
        path in prop_oneof![
            ".{0,200}",
            "(/[a-z0-9_.:-]{0,70}){0,8}",
            "/kubepods.slice/kubepods-[a-z]{0,10}-pod[0-9a-f_]{0,40}.slice/(cri-containerd|docker|crio)-[0-9a-f]{0,70}(.scope)?",
        ],
        lines in prop::collection::vec("[0-9]{0,3}:[a-z,=_]{0,20}:.{0,80}", 0..5),
    ) {
        let _ = cgroup::parse_path(&path);
        let _ = cgroup::parse_proc_cgroup(&lines.join("\n"));
        let _ = cgroup::parse_proc_cgroup(&format!("0::{path}\n"));
    }

    #[test]
    fn config_file_never_panics(
        text in prop_oneof![
            ".{0,200}",
            prop::collection::vec(
                (
                    "(probes|listen|interval|log_level|series_ttl|max_series_per_metric|otlp_header|otlp_endpoint|trace_sample_ratio|[a-z_]{1,10})",
                    prop_oneof![
                        "\"[^\"\\\\\n]{0,20}\"",
                        any::<i64>().prop_map(|n| n.to_string()),
                        any::<f64>().prop_map(|f| format!("{f:?}")),
                        Just("[\"tcp\", \"sched\"]".to_owned()),
                        Just("{ a = \"b\", c = 1 }".to_owned()),
                        Just("[[1], {}]".to_owned()),
                        "[\\[\\]{}=\",0-9a-z ]{0,20}",
                    ],
                ),
                0..8,
            )
            .prop_map(|kv| kv.iter().map(|(k, v)| format!("{k} = {v}\n")).collect::<String>()),
        ],
    ) {
        use clap::CommandFactory as _;
        let cmd = crate::cli::Cli::command();
        let run = cmd.find_subcommand("run").expect("run subcommand");
        match crate::config::parse("f.toml", &text, run, &|_| None) {
            Ok(settings) => {
                // Valid settings must also be accepted by clap as defaults.
                let cmd = crate::cli::Cli::command()
                    .mut_subcommand("run", |r| crate::config::install(r, &settings));
                prop_assert!(cmd.try_get_matches_from(["tanzhen", "run"]).is_ok(), "{text}");
            }
            Err(e) => {
                let e = e.to_string();
                prop_assert!(e.starts_with("f.toml:") && !e.contains('\n'), "{e}");
            }
        }
    }

    #[test]
    fn otlp_headers_and_endpoints_never_panic(
        env_headers in ".{0,120}",
        flag_headers in prop::collection::vec(("[ -~]{0,12}", ".{0,20}"), 0..4),
        endpoint in prop_oneof![".{0,60}", "http://[a-z0-9.:\\[\\]%@/?#-]{0,40}"],
        grpc in any::<bool>(),
        attrs in ".{0,80}",
        traces_endpoint in ".{0,40}",
        timeout in ".{0,8}",
        compression in ".{0,6}",
    ) {
        let inputs = ParserInputs {
            endpoint,
            flag_headers,
            env_headers,
            grpc,
            attrs,
            traces_endpoint,
            timeout,
            compression,
        };
        let checked = inputs.check();
        prop_assert!(checked.is_ok(), "{checked:?}");
    }

    #[test]
    fn tcp_event_decoder_never_panics(
        bytes in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..(2 * agent_common::tcp::TCP_EVENT_SIZE)),
            prop::collection::vec(any::<u8>(), agent_common::tcp::TCP_EVENT_SIZE),
        ],
        kind in 0u32..5,
    ) {
        let snapshot = Snapshot::new(100, None);
        let metrics = tcp::TcpMetrics::register(&snapshot);
        let mut bytes = bytes;
        // Half the time make the kind valid so the rest of the record reaches the metrics.
        if bytes.len() >= agent_common::tcp::TCP_EVENT_SIZE && kind < 3 {
            let k = [
                agent_common::tcp::TCP_EVENT_CONNECT_ESTABLISHED,
                agent_common::tcp::TCP_EVENT_CONNECT_FAILED,
                agent_common::tcp::TCP_EVENT_ACCEPT,
            ][kind as usize];
            bytes[24..28].copy_from_slice(&k.to_ne_bytes());
        }
        match tcp::decode(&bytes) {
            Ok(ev) => {
                let _ = tcp::peer(&ev);
                let _ = tcp::comm_str(&ev.comm);
                metrics.record(&ev, &crate::metadata::WorkloadLabels::default());
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    #[test]
    fn process_event_decoder_never_panics(
        bytes in prop::collection::vec(any::<u8>(), 0..(2 * agent_common::sched::PROC_EVENT_SIZE)),
    ) {
        let _ = sched::decode(&bytes);
    }
}
