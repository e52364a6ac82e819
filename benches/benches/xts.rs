//! AES-256-XTS throughput: Slate's batched implementation (`slate::crypto`)
//! against the `xts-mode` crate, per 4 KiB block and per 1 MiB request.
//!
//! `xts-mode` encrypts one 16-byte AES block at a time; Slate whitens a run of
//! blocks with their tweaks and hands the run to `aes`'s multi-block API. Both
//! produce identical bytes (see volume-client/tests/crypto_xts.rs). Run with
//! `cargo bench -p slate-benches --bench xts`.

use aes::cipher::KeyInit;
use aes::Aes256;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use slate::crypto::{VolumeCipher, XtsKey, DATA_UNIT_BYTES};
use std::hint::black_box;
use std::time::Duration;
use xts_mode::{get_tweak_default, Xts128};

fn xts(c: &mut Criterion) {
    let key = XtsKey::generate();
    let ours = VolumeCipher::new(&key);
    let (k1, k2) = key.expose_bytes().split_at(32);
    let theirs = Xts128::new(Aes256::new_from_slice(k1).unwrap(), Aes256::new_from_slice(k2).unwrap());
    let mut group = c.benchmark_group("xts");
    group.measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    for size in [DATA_UNIT_BYTES, 1 << 20] {
        let mut buf = vec![0x5au8; size];
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::new("slate_encrypt", size), &size, |b, _| {
            b.iter(|| ours.encrypt_blocks(black_box(42), &mut buf).unwrap());
        });
        group.bench_with_input(BenchmarkId::new("slate_decrypt", size), &size, |b, _| {
            b.iter(|| ours.decrypt_blocks(black_box(42), &mut buf).unwrap());
        });
        group.bench_with_input(BenchmarkId::new("xts_mode_encrypt", size), &size, |b, _| {
            b.iter(|| theirs.encrypt_area(&mut buf, DATA_UNIT_BYTES, black_box(42), get_tweak_default));
        });
        group.bench_with_input(BenchmarkId::new("xts_mode_decrypt", size), &size, |b, _| {
            b.iter(|| theirs.decrypt_area(&mut buf, DATA_UNIT_BYTES, black_box(42), get_tweak_default));
        });
    }
    group.finish();
}

criterion_group!(benches, xts);
criterion_main!(benches);
