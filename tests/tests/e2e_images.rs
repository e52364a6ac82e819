//! Acceptance 2 (issue 5): whole-image copies with real tools.
//!
//! - `qemu-img convert` of a random 256 MiB raw image (with zero holes) into
//!   the volume and back out gives identical sha256 sums;
//! - `nbdinfo --map` reports data where data was written and zeros where a
//!   TRIM (`qemu-io discard`) or a WRITE_ZEROES (`qemu-io write -z`) went, and
//!   never reports a block holding data as zero (a copy tool would skip it);
//! - `nbdcopy` round-trips another image too (over TCP in one direction).
//!
//! The images come from a seed (printed; `SLATE_E2E_SEED` replays it).

use serde_json::Value;
use slate_tests::cluster::{qemu_io_ok, run_ok, sha256_file, Cluster, TestRng, UpOptions};
use slate_tests::seed_from_env;
use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

const MIB: u64 = 1 << 20;

/// Writes a random image of `size` bytes with `holes` zero runs, all in its second half (the first half
/// is where the trim and write-zeroes checks look); returns the holes (offset, len).
fn random_image(path: &Path, size: u64, rng: &mut TestRng, holes: usize) -> Vec<(u64, u64)> {
    let mut spans: Vec<(u64, u64)> = (0..holes)
        .map(|_| {
            let len = MIB * (1 + rng.below(4));
            let off = size / 2 + MIB * rng.below((size / 2 - len) / MIB);
            (off, len)
        })
        .collect();
    spans.sort_unstable();
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).expect("create image"));
    let mut buf = vec![0u8; MIB as usize];
    for mib in 0..size / MIB {
        let at = mib * MIB;
        if spans.iter().any(|(o, l)| at >= *o && at < o + l) {
            buf.fill(0);
        } else {
            rng.fill(&mut buf);
        }
        f.write_all(&buf).expect("write image");
    }
    f.flush().expect("flush image");
    spans
}

/// The map as (offset, length, type) from `nbdinfo --map --json`.
fn nbd_map(uri: &str) -> Vec<(u64, u64, u64)> {
    let out = run_ok(Command::new("nbdinfo").arg("--map").arg("--json").arg(uri));
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("nbdinfo --map --json: {e}: {out}"));
    v.as_array()
        .expect("a JSON array")
        .iter()
        .map(|e| (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap(), e["type"].as_u64().unwrap()))
        .collect()
}

/// The map's entries overlapping [off, off+len).
fn covering(map: &[(u64, u64, u64)], off: u64, len: u64) -> Vec<(u64, u64, u64)> {
    map.iter().copied().filter(|(o, l, _)| *o < off + len && off < o + l).collect()
}

fn assert_zero(map: &[(u64, u64, u64)], off: u64, len: u64, what: &str) {
    let c = covering(map, off, len);
    assert!(!c.is_empty(), "{what}: the map does not cover [{off}, +{len})");
    for (o, l, t) in c {
        assert!(t & 2 != 0, "{what}: [{off}, +{len}) should read as zero but the map says type {t} at [{o}, +{l})");
    }
}

fn assert_data(map: &[(u64, u64, u64)], off: u64, len: u64, what: &str) {
    let c = covering(map, off, len);
    assert!(!c.is_empty(), "{what}: the map does not cover [{off}, +{len})");
    for (o, l, t) in c {
        assert!(t & 2 == 0, "{what}: [{off}, +{len}) holds data but the map says type {t} (zero) at [{o}, +{l})");
    }
}

#[test]
fn images_round_trip_and_map_is_correct() {
    let seed = seed_from_env("SLATE_E2E_SEED");
    let mut rng = TestRng::new(seed);
    let opts = UpOptions::default();
    let size = opts.volume_size_bytes;
    let cluster = Cluster::start("e2e-images", opts);
    let work = cluster.scratch().to_path_buf();
    let unix = cluster.nbd_unix();
    let tcp = cluster.nbd_tcp();

    // qemu-img convert in and out.
    let src = work.join("src.img");
    let holes = random_image(&src, size, &mut rng, 8);
    let src_sum = sha256_file(&src);
    let t = Instant::now();
    run_ok(Command::new("qemu-img").args(["convert", "-n", "-f", "raw", "-O", "raw"]).arg(&src).arg(&unix));
    let secs_in = t.elapsed().as_secs_f64();
    let out = work.join("out.img");
    let t = Instant::now();
    run_ok(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "raw"]).arg(&unix).arg(&out));
    let secs_out = t.elapsed().as_secs_f64();
    let out_sum = sha256_file(&out);
    eprintln!(
        "qemu-img convert: in {secs_in:.1} s ({:.1} MiB/s), out {secs_out:.1} s ({:.1} MiB/s); sha256 {src_sum} vs {out_sum}",
        (size / MIB) as f64 / secs_in,
        (size / MIB) as f64 / secs_out
    );
    assert_eq!(src_sum, out_sum, "qemu-img convert round trip changed the image");
    let _ = std::fs::remove_file(&out);

    // The map after the copy: every random MiB is data; the holes may be zero or data (both are correct).
    let map = nbd_map(&unix);
    eprintln!("map after the copy: {} extents; holes in the source: {holes:?}", map.len());
    for mib in 0..size / MIB {
        let at = mib * MIB;
        if !holes.iter().any(|(o, l)| at >= *o && at < o + l) {
            assert_data(&map, at, MIB, "random data copied in by qemu-img");
        }
    }

    // TRIM and WRITE_ZEROES, then a small write inside the trimmed range.
    let trim = (16 * MIB, 8 * MIB);
    let zero = (40 * MIB, 4 * MIB);
    let partial_zero = (100 * MIB + 8192, 64 * 1024); // not a whole MiB: only these blocks
    let rewrite = (18 * MIB, 64 * 1024);
    qemu_io_ok(
        &unix,
        &[
            format!("discard {} {}", trim.0, trim.1),
            format!("write -z {} {}", zero.0, zero.1),
            format!("write -z {} {}", partial_zero.0, partial_zero.1),
            format!("write -P 0x5a {} {}", rewrite.0, rewrite.1),
            "flush".into(),
        ],
    );
    qemu_io_ok(
        &tcp,
        &[
            format!("read -P 0 {} {}", trim.0, rewrite.0 - trim.0),
            format!("read -P 0x5a {} {}", rewrite.0, rewrite.1),
            format!("read -P 0 {} {}", rewrite.0 + rewrite.1, trim.0 + trim.1 - rewrite.0 - rewrite.1),
            format!("read -P 0 {} {}", zero.0, zero.1),
            format!("read -P 0 {} {}", partial_zero.0, partial_zero.1),
        ],
    );
    let map = nbd_map(&unix);
    eprintln!("map after trim/zero: {} extents", map.len());
    for (o, l, t) in covering(&map, 15 * MIB, 30 * MIB) {
        eprintln!("  {o:>10} {l:>10} type {t}");
    }
    assert_zero(&map, trim.0, rewrite.0 - trim.0, "trimmed");
    assert_data(&map, rewrite.0, rewrite.1, "written after the trim");
    let after = rewrite.0 + rewrite.1;
    assert_zero(&map, after, trim.0 + trim.1 - after, "trimmed");
    assert_zero(&map, zero.0, zero.1, "write-zeroes");
    assert_zero(&map, partial_zero.0, partial_zero.1, "write-zeroes (64 KiB)");
    assert_data(&map, trim.0 - MIB, MIB, "random data before the trim");
    assert_data(&map, zero.0 + zero.1, MIB, "random data after the write-zeroes");
    assert_data(&map, partial_zero.0 - 8192, 8192, "random data before the 64 KiB zeroes");
    assert_data(&map, partial_zero.0 + partial_zero.1, 4096, "random data after the 64 KiB zeroes");

    // nbdcopy: another image in over the unix socket, out over TCP.
    let src2 = work.join("src2.img");
    random_image(&src2, size, &mut rng, 4);
    let src2_sum = sha256_file(&src2);
    let t = Instant::now();
    run_ok(Command::new("nbdcopy").arg(&src2).arg(&unix));
    let secs_in = t.elapsed().as_secs_f64();
    let out2 = work.join("out2.img");
    let t = Instant::now();
    run_ok(Command::new("nbdcopy").arg(&tcp).arg(&out2));
    let secs_out = t.elapsed().as_secs_f64();
    let out2_sum = sha256_file(&out2);
    eprintln!(
        "nbdcopy: in {secs_in:.1} s ({:.1} MiB/s), out {secs_out:.1} s ({:.1} MiB/s); sha256 {src2_sum} vs {out2_sum}",
        (size / MIB) as f64 / secs_in,
        (size / MIB) as f64 / secs_out
    );
    assert_eq!(src2_sum, out2_sum, "nbdcopy round trip changed the image");
}
