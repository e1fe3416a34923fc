//! PageMap against `HashMap` and `BTreeMap` holding the same content: sequential and random
//! `get` and `insert` over keys of a 4 GiB file in 4 KiB pages (2^20 keys), the shape of the
//! page table of one file handle.

use bigfile_ram::PageMap;
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use std::collections::{BTreeMap, HashMap};
use std::hint::black_box;

const N: u64 = 1 << 20;
/// Keys touched per measured iteration.
const BATCH: u64 = 4096;

/// A fixed pseudo-random permutation-ish sequence (xorshift), so runs are comparable.
fn random_keys(n: u64, count: u64) -> Vec<u64> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    (0..count)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        })
        .collect()
}

trait Map: Default {
    const NAME: &'static str;
    fn ins(&mut self, k: u64, v: u64);
    fn lookup(&self, k: u64) -> Option<&u64>;
}

impl Map for PageMap<u64> {
    const NAME: &'static str = "PageMap";
    fn ins(&mut self, k: u64, v: u64) {
        self.insert(k, v);
    }
    fn lookup(&self, k: u64) -> Option<&u64> {
        self.get(k)
    }
}

impl Map for HashMap<u64, u64> {
    const NAME: &'static str = "HashMap";
    fn ins(&mut self, k: u64, v: u64) {
        self.insert(k, v);
    }
    fn lookup(&self, k: u64) -> Option<&u64> {
        self.get(&k)
    }
}

impl Map for BTreeMap<u64, u64> {
    const NAME: &'static str = "BTreeMap";
    fn ins(&mut self, k: u64, v: u64) {
        self.insert(k, v);
    }
    fn lookup(&self, k: u64) -> Option<&u64> {
        self.get(&k)
    }
}

fn full<M: Map>() -> M {
    let mut m = M::default();
    for k in 0..N {
        m.ins(k, k);
    }
    m
}

fn bench_get<M: Map>(c: &mut Criterion, seq: &[u64], rnd: &[u64]) {
    let m: M = full();
    let mut g = c.benchmark_group("get");
    g.throughput(Throughput::Elements(BATCH));
    for (order, keys) in [("sequential", seq), ("random", rnd)] {
        g.bench_with_input(BenchmarkId::new(M::NAME, order), keys, |b, keys| {
            b.iter(|| {
                let mut sum = 0u64;
                for &k in keys {
                    sum = sum.wrapping_add(*m.lookup(k).unwrap_or(&0));
                }
                black_box(sum)
            })
        });
    }
    g.finish();
}

fn bench_insert<M: Map>(c: &mut Criterion, seq: &[u64], rnd: &[u64]) {
    let mut g = c.benchmark_group("insert");
    g.throughput(Throughput::Elements(BATCH));
    for (order, keys) in [("sequential", seq), ("random", rnd)] {
        g.bench_with_input(BenchmarkId::new(M::NAME, order), keys, |b, keys| {
            // Insert into an empty map: includes building the structure (table allocation,
            // hashing growth, node splits), which is what a freshly opened handle pays.
            b.iter_batched_ref(
                M::default,
                |m| {
                    for &k in keys {
                        m.ins(k, k);
                    }
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

fn benches(c: &mut Criterion) {
    let start = N / 2;
    let seq: Vec<u64> = (start..start + BATCH).collect();
    let rnd = random_keys(N, BATCH);
    bench_get::<PageMap<u64>>(c, &seq, &rnd);
    bench_get::<HashMap<u64, u64>>(c, &seq, &rnd);
    bench_get::<BTreeMap<u64, u64>>(c, &seq, &rnd);
    bench_insert::<PageMap<u64>>(c, &seq, &rnd);
    bench_insert::<HashMap<u64, u64>>(c, &seq, &rnd);
    bench_insert::<BTreeMap<u64, u64>>(c, &seq, &rnd);
}

criterion_group!(pagemap, benches);
criterion_main!(pagemap);
