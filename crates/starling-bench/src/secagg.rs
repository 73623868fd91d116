//! Secure aggregation's cost, whole SecAgg+ rounds in process (`starling bench secagg`):
//! `devices` devices with `params`-parameter updates (plus the weight, loss and accuracy
//! coordinates) run the four steps against one server, a `dropout` share of them leaving
//! (a third after advertising keys, a third after sharing them, a third after sending their
//! masked input). Measured: the bytes a device sends over the bytes of its plain f32 update
//! (the communication expansion: keys, encrypted shares, the masked vector packed at the
//! ring's bits per value, the unmasking shares), the CPU time of an average device, and the
//! server's CPU time. Single-threaded, so CPU time is wall time on an idle core. The result is
//! checked against the plain sum of the survivors' inputs.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use starling_core::secagg::encode::{add_into, FixedPoint};
use starling_core::secagg::protocol::{Aggregator, Client, Envelope, Params};

use crate::BenchError;

/// Extra coordinates every input carries: weight, weighted loss, weighted accuracy, and the
/// weight of devices that report an accuracy.
pub const EXTRA: usize = 4;

/// One run's figures.
#[derive(Debug, Clone, Serialize)]
pub struct SecAggRow {
    /// Devices at the start.
    pub devices: usize,
    /// Parameters per update.
    pub params: usize,
    /// Share of devices that dropped out.
    pub dropout: f64,
    /// Neighbours per device.
    pub degree: usize,
    /// Shares that rebuild a secret.
    pub threshold: usize,
    /// Bits of one input value.
    pub input_bits: u32,
    /// Bits of the ring.
    pub ring_bits: u32,
    /// Devices whose inputs are in the sum.
    pub survivors: usize,
    /// Bytes a surviving device sends, on average.
    pub device_bytes: f64,
    /// Bytes of its plain f32 update.
    pub plain_bytes: usize,
    /// `device_bytes / plain_bytes`.
    pub expansion: f64,
    /// Milliseconds of CPU time of an average surviving device, all steps.
    pub device_cpu_ms: f64,
    /// Milliseconds of the server's CPU time, all steps.
    pub server_cpu_ms: f64,
}

fn envelope_bytes(e: &[Envelope]) -> usize {
    // Each: recipient and sender ids (4 bytes each) and the ciphertext.
    e.iter().map(|e| 8 + e.ciphertext.len()).sum()
}

/// Runs one round and returns its figures; an error if the round fails (too many dropouts
/// for the threshold) or its sum is wrong.
pub fn run(
    devices: usize,
    params: usize,
    dropout: f64,
    input_bits: u32,
    seed: u64,
) -> Result<SecAggRow, BenchError> {
    if devices < 3 || !(0.0..0.9).contains(&dropout) {
        return Err(BenchError::Usage(
            "secagg needs at least 3 devices and a dropout in [0, 0.9)".into(),
        ));
    }
    let usage = |e: starling_core::secagg::encode::EncodeError| BenchError::Usage(e.to_string());
    let fp = FixedPoint::new(input_bits, devices).map_err(usage)?;
    let len = params + EXTRA;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut graph_seed = [0u8; 32];
    rng.fill(&mut graph_seed);
    let p = Params::new(1, devices, 1, fp, len, graph_seed);

    let mut order: Vec<usize> = (0..devices).collect();
    order.shuffle(&mut rng);
    let third = ((devices as f64 * dropout) / 3.0).round() as usize;
    let after_keys: BTreeSet<usize> = order[..third].iter().copied().collect();
    let after_shares: BTreeSet<usize> = order[third..2 * third].iter().copied().collect();
    let after_masked: BTreeSet<usize> = order[2 * third..3 * third].iter().copied().collect();

    let mut device_ns = vec![0u128; devices];
    let mut sent = vec![0usize; devices];
    let mut server_ns = 0u128;
    let mut server = Aggregator::new(p);
    let mut clients = BTreeMap::new();
    let mut expected = vec![0u32; len];
    let mut inputs = Vec::with_capacity(devices);
    for _ in 0..devices {
        let v: Vec<f64> = (0..len).map(|_| rng.random_range(-1.0..1.0)).collect();
        inputs.push(fp.encode(&v, &mut rng));
    }

    // 1. Advertise keys.
    for i in 0..devices {
        let t = Instant::now();
        let (c, keys) = Client::new(i, p, &mut rng);
        device_ns[i] += t.elapsed().as_nanos();
        sent[i] += 64;
        let t = Instant::now();
        server.advertise(i, keys).map_err(err)?;
        server_ns += t.elapsed().as_nanos();
        clients.insert(i, c);
    }
    clients.retain(|i, _| !after_keys.contains(i));
    // 2. Share keys.
    let mut all = Vec::new();
    for (i, c) in &mut clients {
        let t = Instant::now();
        let keys = server.keys_for(*i);
        server_ns += t.elapsed().as_nanos();
        let t = Instant::now();
        let envelopes = c.share_keys(&keys, &mut rng).map_err(err)?;
        device_ns[*i] += t.elapsed().as_nanos();
        sent[*i] += envelope_bytes(&envelopes);
        all.push((*i, envelopes));
    }
    for (i, e) in all {
        let t = Instant::now();
        server.share(i, e).map_err(err)?;
        server_ns += t.elapsed().as_nanos();
    }
    clients.retain(|i, _| !after_shares.contains(i));
    // 3. Masked inputs, packed at the ring's bits per value.
    let packed = (len * fp.bits as usize).div_ceil(8);
    for (i, c) in &mut clients {
        let t = Instant::now();
        let envelopes = server.envelopes_for(*i);
        server_ns += t.elapsed().as_nanos();
        let t = Instant::now();
        let y = c.masked_input(&envelopes, &inputs[*i]).map_err(err)?;
        device_ns[*i] += t.elapsed().as_nanos();
        sent[*i] += packed;
        let t = Instant::now();
        server.masked_input(*i, &y).map_err(err)?;
        server_ns += t.elapsed().as_nanos();
        add_into(&mut expected, &inputs[*i], fp.ring_mask());
    }
    let survivors_set: Vec<usize> = clients.keys().copied().collect();
    clients.retain(|i, _| !after_masked.contains(i));
    // 4. Unmask.
    let t = Instant::now();
    let survivors = server.survivors().map_err(err)?;
    server_ns += t.elapsed().as_nanos();
    for (i, c) in &clients {
        let t = Instant::now();
        let u = c.unmask(&survivors).map_err(err)?;
        device_ns[*i] += t.elapsed().as_nanos();
        sent[*i] += (u.seeds.len() + u.keys.len()) * (4 + 1 + 32);
        let t = Instant::now();
        server.unmask(u).map_err(err)?;
        server_ns += t.elapsed().as_nanos();
    }
    let t = Instant::now();
    let (sum, count) = server.finish().map_err(err)?;
    server_ns += t.elapsed().as_nanos();
    if sum != expected || count != survivors_set.len() {
        return Err(BenchError::Server(
            "the secure sum differs from the survivors' plain sum".into(),
        ));
    }
    // Averages over the devices that took every step.
    let full: Vec<usize> = clients.keys().copied().collect();
    let n = full.len().max(1) as f64;
    let device_bytes = full.iter().map(|&i| sent[i] as f64).sum::<f64>() / n;
    let device_ms = full.iter().map(|&i| device_ns[i] as f64).sum::<f64>() / n / 1e6;
    let plain_bytes = 4 * params;
    Ok(SecAggRow {
        devices,
        params,
        dropout,
        degree: p.degree,
        threshold: p.threshold,
        input_bits,
        ring_bits: fp.bits,
        survivors: count,
        device_bytes,
        plain_bytes,
        expansion: device_bytes / plain_bytes as f64,
        device_cpu_ms: device_ms,
        server_cpu_ms: server_ns as f64 / 1e6,
    })
}

fn err(e: starling_core::secagg::protocol::SecAggError) -> BenchError {
    BenchError::Server(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_round_checks_its_sum_and_counts_its_bytes() {
        let row = run(20, 100, 0.3, 16, 1).unwrap();
        assert_eq!(
            row.survivors,
            20 - 2 * 2,
            "a third of 30% after keys and after shares"
        );
        assert!(row.expansion > 1.0, "{row:?}");
        assert!(row.device_cpu_ms > 0.0 && row.server_cpu_ms > 0.0);
        assert!(run(2, 10, 0.0, 16, 1).is_err());
    }
}
