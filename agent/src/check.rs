//! `tanzhen check` and `tanzhen probes`: what this kernel supports, and what each probe needs.

use std::fmt::Write as _;

use crate::{
    kernel,
    probe::{Hook, PROBES},
};

/// Prints the kernel report; returns whether every probe this build ships can load.
pub fn check() -> bool {
    let mut out = String::new();
    let mut ok = true;
    let uname = kernel::uname();
    let version = kernel::parse_release(&uname.release);
    let row = |out: &mut String, k: &str, v: &str| {
        let _ = writeln!(out, "{k:<18} {v}");
    };
    row(&mut out, "kernel release", &uname.release);
    row(&mut out, "architecture", &uname.machine);
    row(
        &mut out,
        "BTF",
        if kernel::has_btf() {
            "present (/sys/kernel/btf/vmlinux)"
        } else {
            "absent (tanzhen does not need it)"
        },
    );
    let ringbuf = kernel::has_ringbuf();
    match &ringbuf {
        Ok(true) => row(&mut out, "BPF ring buffer", "supported"),
        Ok(false) => {
            ok = false;
            row(
                &mut out,
                "BPF ring buffer",
                "NOT supported (kernel < 5.8); this build needs it",
            );
        }
        Err(e) => {
            ok = false;
            row(
                &mut out,
                "BPF ring buffer",
                &format!("unknown: probing failed: {e} (are you root?)"),
            );
        }
    }
    let tracefs = kernel::tracefs();
    match &tracefs {
        Ok(t) if t.mounted_now => row(
            &mut out,
            "tracefs",
            &format!("mounted now at {}", t.path.display()),
        ),
        Ok(t) => row(
            &mut out,
            "tracefs",
            &format!("mounted at {}", t.path.display()),
        ),
        Err(e) => {
            ok = false;
            row(&mut out, "tracefs", &format!("MISSING: {e}"));
        }
    }
    for p in PROBES {
        let mut problems = Vec::new();
        if let Some(v) = version
            && v < p.min_kernel
        {
            problems.push(format!(
                "needs kernel >= {}.{}",
                p.min_kernel.0, p.min_kernel.1
            ));
        }
        for hook in p.hooks {
            let Hook::Tracepoint { category, name } = *hook;
            let present = tracefs.as_ref().is_ok_and(|t| {
                t.path
                    .join("events")
                    .join(category)
                    .join(name)
                    .join("format")
                    .exists()
            });
            if !present {
                problems.push(format!("{hook} missing"));
            }
        }
        let hooks = p.hook_list();
        let status = match (p.built, problems.is_empty()) {
            (true, true) => format!("ok: {hooks} present"),
            (true, false) => {
                ok = false;
                format!("CANNOT LOAD: {}", problems.join("; "))
            }
            (false, true) => format!("not built in this version (hooks present: {hooks})"),
            (false, false) => format!("not built in this version ({})", problems.join("; ")),
        };
        row(&mut out, &format!("probe {}", p.name), &status);
    }
    print!("{out}");
    ok
}

/// Prints the probe catalogue.
pub fn probes() {
    let mut out = String::new();
    for p in PROBES {
        let state = if p.built {
            ""
        } else {
            "  [not built in this version]"
        };
        let _ = writeln!(out, "{}{state}\n  {}", p.name, p.summary);
        let hooks = p.hook_list();
        let _ = writeln!(out, "  hooks:       {hooks}");
        let _ = writeln!(out, "  min kernel:  {}.{}", p.min_kernel.0, p.min_kernel.1);
        let _ = writeln!(out, "  metrics:     {}\n", p.metrics.join(", "));
    }
    print!("{out}");
}
