//! Profiling mode on the tiny model: training steps fill the table with the ops, parts
//! and phases they ran, and nothing is recorded while profiling is off.

mod common;

use candle_core::Device;
use common::*;
use magictailor::io::progress::Progress;
use magictailor::profile::{self, Kind};
use magictailor::train::{trainer::Trainer, TrainConfig};

fn trainer(root: &std::path::Path) -> Trainer {
    let pair = pair_folder(root, &PairSpec::training());
    let mut cfg = TrainConfig::new(pair, root.join("out"), tiny_sd());
    // One warm-up step, then DS-Bal (momentum forward and EMA).
    (cfg.warmup_steps, cfg.dsbal_steps, cfg.resolution) = (1, 2, 64);
    Trainer::new(cfg, &Device::Cpu, Progress::Quiet).unwrap()
}

// One test: the switch is process-wide, so its on and off halves must not run in parallel.
#[test]
fn training_steps_are_profiled_only_when_enabled() {
    let tmp = tempfile::tempdir().unwrap();
    let mut t = trainer(tmp.path());

    profile::set_enabled(false);
    assert!(profile::Run::start().is_none());
    profile::reset();
    t.train_step().unwrap();
    let off = profile::totals();
    for &k in Kind::ALL {
        assert_eq!(off.calls(k), 0, "{k:?} recorded while profiling was off");
    }

    profile::enable();
    let run = profile::Run::start().expect("profiling is on");
    for _ in 0..2 {
        t.train_step().unwrap();
    }
    let report = run.finish();
    profile::set_enabled(false);
    let table = report.table();
    for kind in [
        Kind::AttentionFwd,
        Kind::AttentionBwd,
        Kind::UNet,
        Kind::TextEncoder,
        Kind::VaeEncode,
        Kind::Optimizer,
        Kind::Backward,
        Kind::Momentum,
        Kind::LoraBwd,
    ] {
        let row = report.row(kind.label());
        assert!(
            row.is_some_and(|r| r.calls > 0 && r.seconds > 0.0),
            "{kind:?} missing from\n{table}"
        );
    }
    // Two steps: one online U-Net forward each, plus the momentum forward of DS-Bal.
    assert_eq!(
        report.row("train step").map(|r| r.calls),
        Some(2),
        "{table}"
    );
    assert_eq!(
        report.row("U-Net forward").map(|r| r.calls),
        Some(4),
        "{table}"
    );
    assert!(
        report.row(profile::UNATTRIBUTED_BACKWARD).is_some(),
        "{table}"
    );
    for r in &report.rows {
        assert!(
            r.seconds <= report.wall_seconds,
            "{} takes {} s of a {} s wall\n{table}",
            r.name,
            r.seconds,
            report.wall_seconds
        );
    }
    // Ops are exclusive: together they fit in the steps that ran them.
    let ops: f64 = (report.rows.iter())
        .filter(|r| r.class == profile::Class::Op)
        .map(|r| r.seconds)
        .sum();
    let steps = report.row("train step").map_or(0.0, |r| r.seconds);
    assert!(ops <= steps, "ops {ops} s > steps {steps} s\n{table}");
    assert_eq!(
        report.to_json()["rows"].as_array().map(Vec::len),
        Some(report.rows.len())
    );
}

#[test]
fn train_json_ends_with_the_profile_and_prints_the_table() {
    let tmp = tempfile::tempdir().unwrap();
    let pair = pair_folder(tmp.path(), &PairSpec::training());
    let (pair, out) = (pair.to_string_lossy(), tmp.path().join("out"));
    let out = out.to_string_lossy();
    let model = tiny_sd();
    let args = [
        "--instance-dir",
        &*pair,
        "--output-dir",
        &*out,
        "--model",
        &*model,
        "--resolution",
        "64",
        "--warmup-steps",
        "1",
        "--dsbal-steps",
        "1",
        "--json",
    ];
    let o = bin_command("train", &args)
        .env("MAGICTAILOR_PROFILE", "1")
        .output()
        .unwrap();
    ok(&o);
    assert!(stderr(&o).contains("ops exclusive"), "{}", stderr(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    let last: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let rows = last["profile"]["rows"].as_array().expect("profile rows");
    assert!(rows
        .iter()
        .any(|r| r["name"] == "attention bwd" && r["calls"].as_u64() > Some(0)));
    assert!(last["profile"]["wall_seconds"].as_f64() > Some(0.0));
}
