//! Acceptance 1 (issue 5): `slate up`, then `qemu-io` writes patterns at many
//! offsets and reads them back, over the unix socket and over TCP, and again
//! after `slate up` is stopped (SIGTERM) and started on the same directory.
//!
//! The offsets come from a seed (printed; `SLATE_E2E_SEED` replays it): one
//! write in each 4 MiB slot of the volume, some of them not 4 KiB aligned (so
//! the read-modify-write path is exercised), and the space between writes is
//! checked to read as zeros.

use slate_tests::cluster::{qemu_io_ok, Cluster, TestRng, UpOptions};
use slate_tests::seed_from_env;
use std::time::Instant;

const SLOT_BYTES: u64 = 4 << 20;

#[derive(Debug, Clone, Copy)]
struct Extent {
    offset: u64,
    len: u64,
    pattern: u8,
}

fn plan(rng: &mut TestRng, volume_bytes: u64, pattern_base: u8) -> Vec<Extent> {
    let slots = volume_bytes / SLOT_BYTES;
    (0..slots)
        .map(|slot| {
            let unaligned = rng.below(4) == 0;
            let unit = if unaligned { 512 } else { 4096 };
            let len = unit * (1 + rng.below(if unaligned { 64 } else { 128 }));
            let room = SLOT_BYTES - len;
            let offset = slot * SLOT_BYTES + unit * rng.below(room / unit + 1);
            // Patterns never 0 so that a lost write cannot pass for zeros.
            let pattern = pattern_base.wrapping_add((slot % 200) as u8).max(1);
            Extent { offset, len, pattern }
        })
        .collect()
}

fn writes(plan: &[Extent]) -> Vec<String> {
    plan.iter().map(|e| format!("write -P 0x{:02x} {} {}", e.pattern, e.offset, e.len)).collect()
}

fn reads(plan: &[Extent]) -> Vec<String> {
    plan.iter().map(|e| format!("read -P 0x{:02x} {} {}", e.pattern, e.offset, e.len)).collect()
}

/// Reads of the gaps before each extent (within its slot) as zeros.
fn zero_reads(plan: &[Extent]) -> Vec<String> {
    plan.iter()
        .filter_map(|e| {
            let slot_start = e.offset / SLOT_BYTES * SLOT_BYTES;
            (e.offset > slot_start).then(|| format!("read -P 0 {} {}", slot_start, e.offset - slot_start))
        })
        .collect()
}

#[test]
fn qemu_io_patterns_survive_restart() {
    let seed = seed_from_env("SLATE_E2E_SEED");
    let mut rng = TestRng::new(seed);
    let opts = UpOptions::default();
    let volume_bytes = opts.volume_size_bytes;
    let mut cluster = Cluster::start("e2e-qemu-io", opts);
    let unix = cluster.nbd_unix();
    let tcp = cluster.nbd_tcp();

    let first = plan(&mut rng, volume_bytes, 0x11);
    let bytes: u64 = first.iter().map(|e| e.len).sum();
    let t = Instant::now();
    qemu_io_ok(&unix, &writes(&first));
    eprintln!("wrote {} extents ({} KiB) over the unix socket in {:?}", first.len(), bytes >> 10, t.elapsed());
    let t = Instant::now();
    qemu_io_ok(&unix, &reads(&first));
    qemu_io_ok(&tcp, &reads(&first));
    qemu_io_ok(&tcp, &zero_reads(&first));
    eprintln!("read them back (unix and tcp) and checked the gaps are zeros in {:?}", t.elapsed());

    // The same data after a clean stop and a start on the same directory.
    let t = Instant::now();
    cluster.restart();
    eprintln!("restart took {:?}", t.elapsed());
    let unix = cluster.nbd_unix();
    qemu_io_ok(&unix, &reads(&first));
    qemu_io_ok(&unix, &zero_reads(&first));

    // Overwrite with new patterns (some extents overlap the old ones), read all back, restart once more.
    let second = plan(&mut rng, volume_bytes, 0x80);
    qemu_io_ok(&cluster.nbd_tcp(), &writes(&second));
    let mut expected: Vec<String> = reads(&second);
    // Old bytes that the new extent of the same slot did not cover must still be there.
    for (old, new) in first.iter().zip(&second) {
        let (o0, o1) = (old.offset, old.offset + old.len);
        let (n0, n1) = (new.offset, new.offset + new.len);
        for (a, b) in [(o0, o1.min(n0)), (o0.max(n1), o1)] {
            if a < b {
                expected.push(format!("read -P 0x{:02x} {a} {}", old.pattern, b - a));
            }
        }
    }
    qemu_io_ok(&unix, &expected);
    cluster.restart();
    qemu_io_ok(&cluster.nbd_unix(), &expected);
    qemu_io_ok(&cluster.nbd_tcp(), &expected);
    eprintln!("checked {} ranges after the second restart", expected.len());
    cluster.stop();
}
