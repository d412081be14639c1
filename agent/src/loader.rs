//! The embedded kernel objects and their loading: one per event transport (aya creates every
//! map of an object at load time, and kernels before 5.8 cannot create a ring buffer map).

use aya::{Btf, Ebpf, EbpfLoader};

use crate::transport::Transport;

/// The object agent/build.rs built from agent-ebpf with the ring buffer transport.
static OBJECT_RINGBUF: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tanzhen-ebpf"));
/// The same programs with the perf event array transport.
static OBJECT_PERF: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tanzhen-ebpf-perf"));

/// The embedded object of `transport`.
#[must_use]
pub fn object(transport: Transport) -> &'static [u8] {
    match transport {
        Transport::Ringbuf => OBJECT_RINGBUF,
        Transport::Perf => OBJECT_PERF,
    }
}

/// Errors loading the object.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "this tanzhen binary was built without its eBPF object (AYA_BUILD_SKIP was set); \
         rebuild it after `cargo xtask setup`"
    )]
    EmptyObject,
    #[error(
        "loading the eBPF object failed: {0} (run `tanzhen check` to see what this kernel lacks)"
    )]
    Ebpf(#[from] aya::EbpfError),
}

/// Parses the object of `transport` and creates its maps (programs are loaded by each probe),
/// relocating against `btf` (`None`: no kernel BTF), with the capacities of `max_entries`
/// (map name, entries) instead of the compiled-in ones.
pub fn load(
    transport: Transport,
    btf: Option<&Btf>,
    max_entries: &[(&'static str, u32)],
) -> Result<Ebpf, LoadError> {
    let obj = object(transport);
    if obj.is_empty() {
        return Err(LoadError::EmptyObject);
    }
    crate::kernel::raise_memlock_rlimit();
    let mut loader = EbpfLoader::new();
    loader.btf(btf);
    for &(name, n) in max_entries {
        loader.map_max_entries(name, n);
    }
    Ok(loader.load(obj)?)
}

/// Writes the settings every probe's programs share (before any of them attaches).
pub fn configure(
    ebpf: &mut Ebpf,
    cfg: agent_common::AgentConfig,
) -> Result<(), aya::maps::MapError> {
    let name = agent_common::AGENT_CONFIG;
    let map = ebpf
        .map_mut(name)
        .ok_or_else(|| aya::maps::MapError::InvalidName { name: name.into() })?;
    aya::maps::Array::try_from(map)?.set(0, cfg, 0)
}

/// The 4.19 / no-BTF rules (DESIGN.md), checked on every object this binary embeds.
#[cfg(test)]
mod rules {
    use object::{Object as _, ObjectSection as _, ObjectSymbol as _, SectionKind, SymbolKind};

    use super::{OBJECT_PERF, OBJECT_RINGBUF};

    /// Highest helper id 4.19 has (`bpf_skb_ancestor_cgroup_id`).
    const MAX_HELPER_4_19: i32 = 83;
    /// Ring buffer helpers (5.8): allowed only in the ring buffer transport's object; the perf
    /// object for older kernels must not call them.
    const RINGBUF_HELPERS: std::ops::RangeInclusive<i32> = 130..=134;
    /// `BPF_MAP_TYPE_RINGBUF`.
    const MAP_TYPE_RINGBUF: u32 = 27;
    /// The verifier's per-program instruction limit before 5.2.
    const MAX_INSNS_4_19: usize = 4096;

    const BPF_JMP: u8 = 0x05;
    const BPF_JMP32: u8 = 0x06;
    const CALL: u8 = 0x85;
    const EXIT: u8 = 0x95;
    const JA: u8 = 0x05;
    const LD_IMM64: u8 = 0x18;

    #[derive(Clone, Copy)]
    struct Insn {
        code: u8,
        src: u8,
        off: i16,
        imm: i32,
    }

    fn decode(data: &[u8]) -> Vec<Insn> {
        data.chunks_exact(8)
            .map(|c| Insn {
                code: c[0],
                src: c[1] >> 4,
                off: i16::from_le_bytes([c[2], c[3]]),
                imm: i32::from_le_bytes([c[4], c[5], c[6], c[7]]),
            })
            .collect()
    }

    /// Successors of instruction `pc` in the control-flow graph.
    fn successors(insns: &[Insn], pc: usize) -> Vec<usize> {
        let i = insns[pc];
        let next = pc + if i.code == LD_IMM64 { 2 } else { 1 };
        if i.code & 0x07 != BPF_JMP && i.code & 0x07 != BPF_JMP32 {
            return vec![next];
        }
        match i.code {
            EXIT => vec![],
            CALL => vec![next],
            JA => vec![jump_target(pc, i.off)],
            _ => vec![next, jump_target(pc, i.off)],
        }
    }

    fn jump_target(pc: usize, off: i16) -> usize {
        usize::try_from(pc as i64 + 1 + i64::from(off)).unwrap_or(usize::MAX)
    }

    /// A cycle in the CFG (what 4.19's verifier rejects as a "back-edge"), found by DFS.
    fn find_loop(insns: &[Insn]) -> Option<(usize, usize)> {
        #[derive(Clone, Copy, PartialEq)]
        enum State {
            New,
            OnStack,
            Done,
        }
        let mut state = vec![State::New; insns.len()];
        let mut stack = vec![(0usize, 0usize)];
        state[0] = State::OnStack;
        while let Some(&mut (pc, ref mut k)) = stack.last_mut() {
            let succ = successors(insns, pc);
            if *k < succ.len() {
                let s = succ[*k];
                *k += 1;
                if s >= insns.len() {
                    continue;
                }
                match state[s] {
                    State::OnStack => return Some((pc, s)),
                    State::New => {
                        state[s] = State::OnStack;
                        stack.push((s, 0));
                    }
                    State::Done => {}
                }
            } else {
                state[pc] = State::Done;
                stack.pop();
            }
        }
        None
    }

    /// Every rule violation in `obj`, per program (function symbol in a program section; one
    /// section may hold several programs).
    fn violations(obj: &[u8], ringbuf: bool) -> Vec<String> {
        let file = object::File::parse(obj).expect("the embedded object is ELF");
        let mut v = Vec::new();
        for sec in file.sections() {
            let name = sec.name().unwrap_or("?");
            if [".rodata", ".data", ".bss"]
                .iter()
                .any(|p| name.starts_with(p))
            {
                v.push(format!("section {name}: global data needs kernel >= 5.2"));
            }
        }
        let mut programs = 0;
        for sym in file.symbols() {
            let Some(sec) = sym
                .section_index()
                .and_then(|i| file.section_by_index(i).ok())
            else {
                continue;
            };
            let sec_name = sec.name().unwrap_or("?");
            if sym.kind() != SymbolKind::Text
                || sec.kind() != SectionKind::Text
                || sec_name == ".text"
                || sec_name.starts_with(".text.")
            {
                continue;
            }
            programs += 1;
            let name = format!("{sec_name}/{}", sym.name().unwrap_or("?"));
            let data = sec.data().expect("section data");
            let start = usize::try_from(sym.address() - sec.address()).unwrap();
            let end = (start + usize::try_from(sym.size()).unwrap()).min(data.len());
            v.extend(program_violations(
                &name,
                &decode(&data[start..end]),
                ringbuf,
            ));
        }
        if programs == 0 {
            v.push("no programs found".into());
        }
        if !ringbuf {
            v.extend(ringbuf_maps(&file));
        }
        v
    }

    /// Ring buffer maps in the legacy `maps` section (each a `bpf_map_def` whose first word is
    /// the map type): a kernel before 5.8 cannot create them, and aya creates every map.
    fn ringbuf_maps(file: &object::File<'_>) -> Vec<String> {
        let mut v = Vec::new();
        for sym in file.symbols() {
            let Some(sec) = sym
                .section_index()
                .and_then(|i| file.section_by_index(i).ok())
            else {
                continue;
            };
            if sec.name() != Ok("maps") {
                continue;
            }
            let data = sec.data().expect("maps section data");
            let start = usize::try_from(sym.address() - sec.address()).unwrap();
            let Some(word) = data.get(start..start + 4) else {
                continue;
            };
            if u32::from_le_bytes(word.try_into().unwrap()) == MAP_TYPE_RINGBUF {
                v.push(format!(
                    "map {}: a ring buffer (kernel >= 5.8) in the perf object",
                    sym.name().unwrap_or("?")
                ));
            }
        }
        v
    }

    fn program_violations(name: &str, insns: &[Insn], ringbuf: bool) -> Vec<String> {
        let mut v = Vec::new();
        if insns.len() > MAX_INSNS_4_19 {
            v.push(format!(
                "{name}: {} instructions (4.19 allows {MAX_INSNS_4_19})",
                insns.len()
            ));
        }
        for (pc, i) in insns.iter().enumerate() {
            if i.code & 0x07 == BPF_JMP32 {
                v.push(format!(
                    "{name}+{pc}: jmp32 instruction (eBPF CPU v3, kernel >= 5.1)"
                ));
            }
            if i.code == CALL && i.src == 1 {
                v.push(format!(
                    "{name}+{pc}: call into .text (memset/memcpy loops or a subprogram)"
                ));
            }
            if i.code == CALL
                && i.src == 0
                && i.imm > MAX_HELPER_4_19
                && !(ringbuf && RINGBUF_HELPERS.contains(&i.imm))
            {
                v.push(format!("{name}+{pc}: helper {} is newer than 4.19", i.imm));
            }
        }
        if let Some((from, to)) = find_loop(insns) {
            v.push(format!(
                "{name}: loop (back-edge {from} -> {to}) needs kernel >= 5.3"
            ));
        }
        v
    }

    #[test]
    fn embedded_objects_follow_the_4_19_rules() {
        for (name, obj, ringbuf) in [
            ("tanzhen-ebpf", OBJECT_RINGBUF, true),
            ("tanzhen-ebpf-perf", OBJECT_PERF, false),
        ] {
            assert!(
                !obj.is_empty(),
                "built with AYA_BUILD_SKIP: no object {name} to check"
            );
            let v = violations(obj, ringbuf);
            assert!(
                v.is_empty(),
                "{name}: kernel compatibility rules broken:\n{}",
                v.join("\n")
            );
        }
    }

    /// Names of the programs (function symbols in program sections) of `obj`.
    fn program_names(obj: &[u8]) -> std::collections::BTreeSet<String> {
        let file = object::File::parse(obj).expect("ELF");
        file.symbols()
            .filter(|sym| sym.kind() == SymbolKind::Text)
            .filter(|sym| {
                sym.section_index()
                    .and_then(|i| file.section_by_index(i).ok())
                    .is_some_and(|sec| {
                        let n = sec.name().unwrap_or("");
                        sec.kind() == SectionKind::Text && n != ".text" && !n.starts_with(".text.")
                    })
            })
            .map(|sym| sym.name().unwrap_or("?").to_owned())
            .collect()
    }

    #[test]
    fn both_objects_hold_the_same_programs() {
        let ring = program_names(OBJECT_RINGBUF);
        assert!(
            ring.contains("tcp_inet_sock_set_state")
                && ring.contains("tcp_kprobe_set_state")
                && ring.contains("bench_sys_enter")
        );
        assert_eq!(ring, program_names(OBJECT_PERF));
    }

    #[test]
    fn the_perf_object_has_no_ring_buffer() {
        // The check itself must see the ring buffer maps of the ringbuf object.
        let file = object::File::parse(OBJECT_RINGBUF).unwrap();
        let found = ringbuf_maps(&file);
        assert_eq!(found.len(), 3, "{found:?}");
        let file = object::File::parse(OBJECT_PERF).unwrap();
        assert!(ringbuf_maps(&file).is_empty());
    }

    #[test]
    fn loop_detection_finds_cycles_only() {
        let ins = |code, off| Insn {
            code,
            src: 0,
            off,
            imm: 0,
        };
        // 0: if r1 == 0 goto +1; 1: ja -2 (back to 0: a loop); 2: exit
        assert_eq!(
            find_loop(&[ins(0x15, 1), ins(JA, -2), ins(EXIT, 0)]),
            Some((1, 0))
        );
        // 0: if r1 == 0 goto +2; 1: ja +2; 2: exit; 3: ja -2 (to 2: backward, no cycle)
        assert_eq!(
            find_loop(&[ins(0x15, 2), ins(JA, 2), ins(EXIT, 0), ins(JA, -2)]),
            None
        );
    }
}
