//! `magictailor batch` on the tiny model: many pairs with one model load, re-runs that
//! skip or resume, workers that never train a pair twice, shards that cover every pair
//! once, and bad pairs recorded without stopping the others.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A trainable pair folder named `{concept}+{component}` under `root`.
fn pair(root: &Path, concept: &'static str, component: &'static str) -> PathBuf {
    let mut spec = PairSpec::training();
    spec.samples[0].0 = concept;
    spec.samples[1].0 = component;
    pair_folder(root, &spec)
}

/// `n` pairs in `root/pairs/`: person_a+hair_a, person_b+hair_b, ...
fn pairs(root: &Path, n: usize) -> PathBuf {
    let dir = root.join("pairs");
    let names = [
        ("person_a", "hair_a"),
        ("person_b", "hair_b"),
        ("person_c", "hair_c"),
        ("person_d", "hair_d"),
        ("person_e", "hair_e"),
    ];
    for (c, h) in &names[..n] {
        pair(&dir, c, h);
    }
    dir
}

fn batch_args<'a>(pairs: &'a str, root: &'a str, model: &'a str) -> Vec<&'a str> {
    vec![
        "--pairs",
        pairs,
        "--out-dir",
        root,
        "--model",
        model,
        "--resolution",
        "64",
        "--warmup-steps",
        "2",
        "--dsbal-steps",
        "2",
        "--json",
    ]
}

/// `batch_summary.jsonl`, one value per line.
fn summary(root: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(root.join("batch_summary.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn statuses(records: &[serde_json::Value]) -> Vec<(String, String)> {
    records
        .iter()
        .map(|r| {
            (
                r["pair"].as_str().unwrap().into(),
                r["status"].as_str().unwrap().into(),
            )
        })
        .collect()
}

/// Three pairs in one process load the model once; a re-run skips them all without
/// touching their logs.
#[test]
fn three_pairs_train_with_one_model_load_and_a_rerun_skips_them() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, root, model) = (pairs(tmp.path(), 3), tmp.path().join("out"), tiny_sd());
    let args = batch_args(dir.to_str().unwrap(), root.to_str().unwrap(), &model);
    ok(&run_bin("batch", &args));
    let first = summary(&root);
    assert_eq!(first.len(), 3);
    for r in &first {
        assert_eq!(r["status"], "trained", "{r}");
        assert_eq!(r["steps_done"], 4);
        assert_eq!(
            r["model_loads_in_process"], 1,
            "one model load for all pairs: {r}"
        );
        let out = root.join(r["pair"].as_str().unwrap());
        assert_eq!(read_log(&out).len(), 4);
        assert!(out.join("pytorch_lora_weights.safetensors").exists());
    }
    let table = std::fs::read_to_string(root.join("batch_summary.md")).unwrap();
    assert!(
        table.contains("| person_b+hair_b | magictailor | trained | 4/4 |"),
        "{table}"
    );

    let o = run_bin("batch", &args);
    ok(&o);
    let again = &summary(&root)[3..];
    assert!(again
        .iter()
        .all(|r| r["status"] == "skipped" && r["note"] == "complete"));
    assert!(
        again.iter().all(|r| r["model_loads_in_process"] == 0),
        "nothing to load for"
    );
    for r in again {
        assert_eq!(read_log(&root.join(r["pair"].as_str().unwrap())).len(), 4);
    }
}

/// A pair with a mask missing between two good ones: recorded as failed with the reason,
/// the others train, the worker exits 1. Its output folder is never created.
#[test]
fn a_bad_pair_in_the_middle_is_recorded_and_the_others_train() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = pairs(tmp.path(), 2);
    let mut spec = PairSpec::training();
    spec.samples[0].0 = "person_ab";
    let bad = pair_folder(&dir, &spec);
    std::fs::remove_file(bad.join("masks/1_hair_c2.png")).unwrap();
    let (root, model) = (tmp.path().join("out"), tiny_sd());
    let o = run_bin(
        "batch",
        &batch_args(dir.to_str().unwrap(), root.to_str().unwrap(), &model),
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let records = summary(&root);
    let want = [
        ("person_a+hair_a", "trained"),
        ("person_ab+hair_c", "failed"),
        ("person_b+hair_b", "trained"),
    ];
    let want: Vec<(String, String)> = want
        .iter()
        .map(|(p, s)| (p.to_string(), s.to_string()))
        .collect();
    assert_eq!(statuses(&records), want);
    assert!(records[1]["note"]
        .as_str()
        .unwrap()
        .contains("but not for 1_hair_c2"));
    assert!(!root.join("person_ab+hair_c").exists());
}

/// The pairs a worker's dry run would train.
fn planned(args: &[&str], env: &[(&str, &str)]) -> Vec<String> {
    let mut c = bin_command("batch", &with_args(args.to_vec(), &["--dry-run"]));
    for (k, v) in env {
        c.env(k, v);
    }
    let o = c.output().unwrap();
    ok(&o);
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["plan"] == "train")
        .map(|v| v["pair"].as_str().unwrap().to_string())
        .collect()
}

/// For 1, 2 and 3 shards, from flags, a Slurm array (ids from 1) or a Kubernetes indexed
/// Job, every pair lands in exactly one shard.
#[test]
fn shards_cover_every_pair_exactly_once() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, root, model) = (pairs(tmp.path(), 5), tmp.path().join("out"), tiny_sd());
    let args = batch_args(dir.to_str().unwrap(), root.to_str().unwrap(), &model);
    let all: BTreeSet<String> = planned(&args, &[]).into_iter().collect();
    assert_eq!(all.len(), 5);
    for n in 1..=3usize {
        let (count, ids) = (
            n.to_string(),
            (0..n).map(|i| i.to_string()).collect::<Vec<_>>(),
        );
        let slurm_ids: Vec<String> = (1..=n).map(|i| i.to_string()).collect();
        let ways: Vec<Vec<Vec<String>>> = vec![
            (ids.iter())
                .map(|i| {
                    planned(
                        &with_args(args.clone(), &["--shard-index", i, "--shard-count", &count]),
                        &[],
                    )
                })
                .collect(),
            (slurm_ids.iter())
                .map(|i| {
                    let env = [
                        ("SLURM_ARRAY_TASK_ID", i.as_str()),
                        ("SLURM_ARRAY_TASK_MIN", "1"),
                        ("SLURM_ARRAY_TASK_COUNT", &count),
                    ];
                    planned(&args, &env)
                })
                .collect(),
            (ids.iter())
                .map(|i| {
                    planned(
                        &with_args(args.clone(), &["--shard-count", &count]),
                        &[("JOB_COMPLETION_INDEX", i)],
                    )
                })
                .collect(),
        ];
        for shards in ways {
            let mut seen: Vec<String> = shards.concat();
            seen.sort();
            assert_eq!(
                seen,
                all.iter().cloned().collect::<Vec<_>>(),
                "{n} shards: {shards:?}"
            );
        }
    }
    let o = run_bin(
        "batch",
        &with_args(args, &["--shard-index", "3", "--shard-count", "3"]),
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}

fn spawn_batch(args: &[&str]) -> Child {
    bin_command("batch", args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Two workers started together on the same list: each pair is trained exactly once,
/// its log holds each step once, and the other worker records it as skipped.
#[test]
fn two_workers_train_each_pair_exactly_once() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, root, model) = (pairs(tmp.path(), 3), tmp.path().join("out"), tiny_sd());
    let mut args = batch_args(dir.to_str().unwrap(), root.to_str().unwrap(), &model);
    set_arg(&mut args, "--warmup-steps", "20");
    let workers = [spawn_batch(&args), spawn_batch(&args)];
    for w in workers {
        let o = w.wait_with_output().unwrap();
        ok(&o);
    }
    let records = summary(&root);
    for p in ["person_a+hair_a", "person_b+hair_b", "person_c+hair_c"] {
        let mine: Vec<&serde_json::Value> = records.iter().filter(|r| r["pair"] == p).collect();
        let trained = mine.iter().filter(|r| r["status"] == "trained").count();
        assert_eq!(trained, 1, "{p}: {mine:?}");
        assert!(mine
            .iter()
            .all(|r| r["status"] != "failed" && r["status"] != "crashed"));
        let steps: Vec<u64> = read_log(&root.join(p))
            .iter()
            .map(|l| l["step"].as_u64().unwrap())
            .collect();
        assert_eq!(
            steps,
            (1..=22).collect::<Vec<_>>(),
            "{p}: each step once, in order"
        );
    }
}

/// A worker killed with -9 in the middle of a pair: the re-run skips the finished pair
/// and resumes the interrupted one from its checkpoint, with the same weights as a
/// plain `train` of that pair.
#[test]
fn a_killed_batch_resumes_the_interrupted_pair_bit_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, root, model) = (pairs(tmp.path(), 2), tmp.path().join("out"), tiny_sd());
    let steps = [
        "--warmup-steps",
        "30",
        "--dsbal-steps",
        "30",
        "--checkpoint-every",
        "5",
    ];
    let mut args = batch_args(dir.to_str().unwrap(), root.to_str().unwrap(), &model);
    for pair in steps.chunks(2) {
        match args.iter().any(|a| *a == pair[0]) {
            true => set_arg(&mut args, pair[0], pair[1]),
            false => args.extend_from_slice(pair),
        }
    }
    let mut worker = spawn_batch(&args);
    let second = root.join("person_b+hair_b");
    let start = Instant::now();
    while !second.join("checkpoints/step-000010.safetensors").exists() {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the second pair never got going"
        );
        assert!(
            worker.try_wait().unwrap().is_none(),
            "the batch ended before the kill"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    worker.kill().unwrap();
    worker.wait().unwrap();
    assert!(!second.join("magictailor.json").exists(), "killed mid-pair");

    ok(&run_bin("batch", &args));
    let last: Vec<(String, String)> = statuses(&summary(&root)).into_iter().skip(1).collect();
    let want = vec![
        ("person_a+hair_a".to_string(), "skipped".to_string()),
        ("person_b+hair_b".to_string(), "trained".to_string()),
    ];
    assert_eq!(last, want);

    let alone = tmp.path().join("alone");
    let instance = dir.join("person_b+hair_b");
    let train_args = with_args(
        quiet_train_args(instance.to_str().unwrap(), alone.to_str().unwrap(), &model),
        &steps,
    );
    ok(&run_bin("train", &train_args));
    for f in [
        "pytorch_lora_weights.safetensors",
        "learned_embeds.safetensors",
    ] {
        assert!(
            read_bytes(&second.join(f)) == read_bytes(&alone.join(f)),
            "{f} differs"
        );
    }
}

/// A pair that stops after its first checkpoint (a full disk, through a test hook), then
/// fails to load on the re-run (a mask gone), is recorded each time with its last good
/// checkpoint and the way on (the same batch command, no `--resume`); once mended, the
/// re-run resumes it.
#[test]
fn a_stopped_pair_names_its_last_checkpoint_and_the_batch_way_on() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, root, model) = (pairs(tmp.path(), 1), tmp.path().join("out"), tiny_sd());
    let (dir_s, root_s) = (dir.to_str().unwrap(), root.to_str().unwrap());
    let mut args = batch_args(dir_s, root_s, &model);
    args.extend(["--checkpoint-every", "1"]);
    let o = bin_command("batch", &args)
        .env("MAGICTAILOR_TEST_FULL_DISK", "step-000003")
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(75),
        "a full disk is the machine's: {}",
        stderr(&o)
    );
    let last = root.join("person_a+hair_a/checkpoints/step-000002.safetensors");
    let way_on = "run the same batch command again: it resumes this pair from there";
    let note = |records: &[serde_json::Value]| records.last().unwrap()["note"].to_string();
    let n = note(&summary(&root));
    assert!(
        n.contains("No space left on device") && n.contains(way_on),
        "{n}"
    );
    assert!(
        n.contains(&last.display().to_string()) && !n.contains("--resume"),
        "{n}"
    );

    let mask = dir.join("person_a+hair_a/masks/1_hair_a2.png");
    let kept = std::fs::read(&mask).unwrap();
    std::fs::remove_file(&mask).unwrap();
    let o = run_bin("batch", &args);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let n = note(&summary(&root));
    assert!(
        n.contains("but not for 1_hair_a2") && n.contains(way_on),
        "{n}"
    );
    assert!(n.contains(&last.display().to_string()), "{n}");

    std::fs::write(&mask, kept).unwrap();
    ok(&run_bin("batch", &args));
    let records = summary(&root);
    assert_eq!(records.last().unwrap()["status"], "trained");
}

/// Finished pairs re-run with a setting that shapes the result changed are conflicts,
/// recorded as failures naming the difference, never runs to extend; the dry run says so.
#[test]
fn finished_pairs_trained_with_other_settings_are_conflicts_not_extended() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, root, model) = (pairs(tmp.path(), 2), tmp.path().join("out"), tiny_sd());
    let (dir_s, root_s) = (dir.to_str().unwrap(), root.to_str().unwrap());
    let args = batch_args(dir_s, root_s, &model);
    ok(&run_bin("batch", &args));
    let log = |p: &str| std::fs::read_to_string(root.join(p).join("train_log.jsonl")).unwrap();
    let before = log("person_a+hair_a");

    let mut more = args.clone();
    set_arg(&mut more, "--warmup-steps", "6");
    let dry = run_bin("batch", &with_args(more.clone(), &["--dry-run"]));
    ok(&dry);
    let plans = String::from_utf8_lossy(&dry.stdout);
    assert!(
        plans.contains("fail: ") && plans.contains("--warmup-steps"),
        "{plans}"
    );
    let o = run_bin("batch", &more);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let records = summary(&root);
    for r in &records[records.len() - 2..] {
        assert_eq!(r["status"], "failed", "{r}");
        let note = r["note"].as_str().unwrap();
        assert!(
            note.contains("--warmup-steps (warmup_steps): 6 now, 2 when"),
            "{note}"
        );
    }
    assert_eq!(log("person_a+hair_a"), before, "not extended");
}

/// The dry run loads each pair it would train, as training does: a bad pair shows as a
/// failure before any job starts.
#[test]
fn the_dry_run_checks_the_pairs() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = pairs(tmp.path(), 2);
    std::fs::remove_file(dir.join("person_b+hair_b/masks/1_hair_b2.png")).unwrap();
    let (root, model) = (tmp.path().join("out"), tiny_sd());
    let args = batch_args(dir.to_str().unwrap(), root.to_str().unwrap(), &model);
    let o = run_bin("batch", &with_args(args, &["--dry-run"]));
    ok(&o);
    let plans: Vec<String> = (String::from_utf8_lossy(&o.stdout).lines())
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .map(|v| v["plan"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(plans.len(), 2, "{plans:?}");
    assert_eq!(plans[0], "train");
    assert!(
        plans[1].starts_with("fail: ") && plans[1].contains("1_hair_b2"),
        "{plans:?}"
    );
    assert!(
        !root.join("person_a+hair_a").exists(),
        "a dry run writes nothing"
    );
}
