//! The collapse benchmark's tables: medians over rounds, a table per (vCPU count, allocation
//! latency) with its ratios, and each order's write-lock p99 across latencies.

use hdrhistogram::Histogram;
use serde_json::{Value, json};

use super::{CollapseBenchConfig, Point};
use crate::metrics::percentiles;

/// One variant's figures over several rounds: the median of every number (a latency
/// percentile, a time, a rate), the sum of lost writes, and every round kept as it was.
pub(super) fn median_of_rounds(rounds: &[Value]) -> Value {
    fn merge(values: &[&Value]) -> Value {
        match values[0] {
            Value::Object(first) => Value::Object(
                first
                    .keys()
                    .map(|k| {
                        (
                            k.clone(),
                            merge(&values.iter().map(|v| &v[k.as_str()]).collect::<Vec<_>>()),
                        )
                    })
                    .collect(),
            ),
            Value::Number(_) => {
                let mut nums: Vec<f64> = values.iter().filter_map(|v| v.as_f64()).collect();
                if nums.len() < values.len() {
                    return Value::Null;
                }
                json!(crate::bench::median(&mut nums))
            }
            other => other.clone(),
        }
    }
    let mut merged = merge(&rounds.iter().collect::<Vec<_>>());
    merged["lost_writes"] = json!(
        rounds
            .iter()
            .filter_map(|r| r["lost_writes"].as_u64())
            .sum::<u64>()
    );
    merged["all_huge"] = json!(rounds.iter().all(|r| r["all_huge"] == true));
    merged["rounds"] = json!(rounds);
    merged
}

/// The bare costs a collapse's write window is compared with.
pub(super) struct Floor {
    memcpy_p99: f64,
    mremap_p50: f64,
    mremap_p99: f64,
    memcpy_p50: f64,
    pub(super) json: Value,
}

impl Floor {
    pub(super) fn of(memcpy: &Histogram<u64>, mremap: &Histogram<u64>) -> Floor {
        Floor {
            memcpy_p50: memcpy.value_at_quantile(0.5) as f64,
            memcpy_p99: memcpy.value_at_quantile(0.99) as f64,
            mremap_p50: mremap.value_at_quantile(0.5) as f64,
            mremap_p99: mremap.value_at_quantile(0.99) as f64,
            json: json!({ "memcpy_2m_ns": percentiles(memcpy), "mremap_2m_ns": percentiles(mremap) }),
        }
    }

    pub(super) fn print(&self) {
        println!(
            "floor: bare 2 MiB memcpy p50 {:.0}us p99 {:.0}us; bare 2 MiB mremap p50 {:.0}us p99 {:.0}us",
            self.memcpy_p50 / 1e3,
            self.memcpy_p99 / 1e3,
            self.mremap_p50 / 1e3,
            self.mremap_p99 / 1e3
        );
    }
}

fn p(v: &Value, k: &str) -> Option<f64> {
    v[k].as_f64()
}

fn triple(v: &Value) -> String {
    match (p(v, "p50"), p(v, "p99"), p(v, "max")) {
        (Some(a), Some(b), Some(c)) => format!("{:.0}/{:.0}/{:.0}us", a / 1e3, b / 1e3, c / 1e3),
        _ => "n/a".into(),
    }
}

/// Prints one table and its ratios; returns them as JSON.
pub(super) fn report_table(
    config: &CollapseBenchConfig,
    at: Point,
    results: &[Value],
    floor: &Floor,
) -> Value {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    // What allocating a huge page cost in this table's runs, as the pool timed it.
    let mut seen: Vec<f64> = results
        .iter()
        .filter_map(|r| p(&r["pool_alloc_ns"], "p50"))
        .collect();
    let seen = (!seen.is_empty()).then(|| crate::bench::median(&mut seen));
    println!(
        "vmm bench collapse: {} vCPU(s) on a {cpus}-CPU host writing {} of guest RAM ({} stress passes), allocation {}, {} round(s), medians; a huge page's allocation took p50 {} here",
        at.vcpus,
        config.memory,
        config.passes,
        at.allocation(),
        config.repeat.max(1),
        seen.map_or("-".into(), |ns| format!("{:.0} us", ns / 1e3)),
    );
    if at.vcpus as usize > cpus {
        println!("(oversubscribed: {} vCPUs on {cpus} host CPUs)", at.vcpus);
    }
    println!(
        "{:<22} {:>9} {:>6} {:>22} {:>22} {:>22} {:>13} {:>8} {:>5} {:>4}",
        "variant",
        "all huge",
        "GiB/s",
        "write lock p50/p99/max",
        "commit p50/p99/max",
        "guest stall p50/p99/max",
        "alloc p50/p99",
        "pool hit",
        "fails",
        "lost"
    );
    for j in results {
        if j["no_figures"] == true {
            println!(
                "{:<22} no figures (it failed or was not run; see above)",
                j["variant"].as_str().unwrap_or("?")
            );
            continue;
        }
        let f = &j["failures"];
        let fails: u64 = ["alloc", "charge", "revalidate", "other", "madv_collapse"]
            .iter()
            .filter_map(|k| f[k].as_u64())
            .sum();
        println!(
            "{:<22} {:>9} {:>6} {:>22} {:>22} {:>22} {:>13} {:>8} {:>5} {:>4}",
            j["variant"].as_str().unwrap_or("?"),
            j["time_to_all_huge_ns"]
                .as_f64()
                .map_or("not all".into(), |n| format!("{:.0}ms", n / 1e6)),
            j["throughput_gib_per_s"]
                .as_f64()
                .map_or("-".into(), |g| format!("{g:.2}")),
            triple(&j["write_lock_ns"]),
            triple(&j["commit_ns"]),
            triple(&j["guest_stall_ns"]),
            match (p(&j["alloc_ns"], "p50"), p(&j["alloc_ns"], "p99")) {
                (Some(a), Some(b)) => format!("{:.0}/{:.0}us", a / 1e3, b / 1e3),
                _ => "n/a".into(),
            },
            j["pool_hit_rate"]
                .as_f64()
                .map_or("-".into(), |h| format!("{:.0}%", h * 100.0)),
            fails,
            j["lost_writes"],
        );
    }
    let find = |name: &str, key: &str| {
        results
            .iter()
            .find(|r| r["variant"] == name)
            .and_then(|r| p(&r[key], "p99"))
    };
    let mut ratios = json!({});
    for r in results {
        let name = r["variant"].as_str().unwrap_or("?");
        if let Some(w) = p(&r["write_lock_ns"], "p99") {
            println!(
                "{name}: write-lock p99 = {:.2}x bare mremap p99, {:.2}x bare memcpy p99",
                w / floor.mremap_p99.max(1.0),
                w / floor.memcpy_p99.max(1.0)
            );
            ratios[name] = json!({
                "write_lock_p99_over_mremap_p99": w / floor.mremap_p99.max(1.0),
                "write_lock_p99_over_memcpy_p99": w / floor.memcpy_p99.max(1.0),
            });
        }
    }
    for suffix in ["", "/mremap"] {
        let (pre, leg) = (format!("prealloc{suffix}"), format!("legacy{suffix}"));
        if let (Some(a), Some(b)) = (find(&pre, "write_lock_ns"), find(&leg, "write_lock_ns")) {
            println!(
                "{pre} write-lock p99 / {leg} write-lock p99 = {:.3} (1/{:.1})",
                a / b,
                b / a
            );
            ratios[format!("{pre}_over_{leg}_write_lock_p99")] = json!(a / b);
        }
        if let (Some(a), Some(b)) = (find(&pre, "guest_stall_ns"), find(&leg, "guest_stall_ns")) {
            println!(
                "{pre} guest stall p99 / {leg} guest stall p99 = {:.3} (1/{:.1})",
                a / b,
                b / a
            );
            ratios[format!("{pre}_over_{leg}_guest_stall_p99")] = json!(a / b);
        }
    }
    println!();
    json!({
        "vcpus": at.vcpus,
        "alloc_latency_ms": at.alloc_latency.as_secs_f64() * 1e3,
        "cold": at.cold,
        "alloc_ns_p50_seen": seen,
        "variants": results,
        "ratios": ratios,
    })
}

/// For each vCPU count and each of this VMM's rows: the write-lock p99 at every latency and
/// its ratio to the first latency's (the seed's claim: prealloc's stays flat, legacy's grows).
pub(super) fn report_latency_sweep(tables: &[Value]) -> Value {
    let mut out = Vec::new();
    let mut seen = Vec::new();
    // The cold tables are not on the latency axis.
    let tables: Vec<&Value> = tables.iter().filter(|t| t["cold"] != true).collect();
    let tables = &tables[..];
    for &t in tables {
        let vcpus = t["vcpus"].as_u64().unwrap_or(0);
        if seen.contains(&vcpus) {
            continue;
        }
        seen.push(vcpus);
        let same: Vec<&Value> = tables
            .iter()
            .copied()
            .filter(|u| u["vcpus"] == vcpus)
            .collect();
        if same.len() < 2 {
            continue;
        }
        for row in t["variants"].as_array().into_iter().flatten() {
            let Some(name) = row["variant"].as_str() else {
                continue;
            };
            let series: Vec<(f64, f64)> = same
                .iter()
                .filter_map(|u| {
                    let r = u["variants"]
                        .as_array()?
                        .iter()
                        .find(|r| r["variant"] == name)?;
                    Some((
                        u["alloc_latency_ms"].as_f64()?,
                        p(&r["write_lock_ns"], "p99")?,
                    ))
                })
                .collect();
            let Some(&(_, base)) = series.first() else {
                continue;
            };
            let text: Vec<String> = series
                .iter()
                .map(|(ms, w)| format!("{ms} ms: {:.0}us ({:.2}x)", w / 1e3, w / base.max(1.0)))
                .collect();
            println!(
                "{name} x{vcpus}: write-lock p99 by alloc latency: {}",
                text.join(", ")
            );
            out.push(json!({
                "variant": name,
                "vcpus": vcpus,
                "write_lock_p99_ns": series.iter().map(|(ms, w)| json!({"alloc_latency_ms": ms, "p99": w, "over_first": w / base.max(1.0)})).collect::<Vec<_>>(),
            }));
        }
    }
    json!(out)
}
