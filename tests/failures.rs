//! Failures a long run meets, as a user meets them through the binary: NaN and infinity
//! in files and in training, two runs in one folder, Ctrl-C and SIGTERM. Each ends with
//! a non-zero exit, a message naming the file or step and the fix, and no good state lost.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Output};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use common::*;

const LOCK: &str = ".magictailor.lock";

/// `file` rewritten with one value of tensor `key` (or all, with `all`) set to `value`.
fn poison(file: &Path, key: &str, value: f32, out: &Path) {
    rewrite(file, key, value, false, out)
}

fn rewrite(file: &Path, key: &str, value: f32, all: bool, out: &Path) {
    let mut tensors: HashMap<String, Tensor> =
        candle_core::safetensors::load(file, &Device::Cpu).unwrap();
    let t = &tensors[key];
    let mut v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mid = v.len() / 2;
    v[mid] = value;
    if all {
        v.fill(value);
    }
    let poisoned = Tensor::from_vec(v, t.shape(), &Device::Cpu).unwrap();
    tensors.insert(key.to_string(), poisoned);
    candle_core::safetensors::save(&tensors, out).unwrap();
}

/// `infer_args` plus a LoRA and the fixture embeddings.
fn infer_with_lora(model: &str, out: &Path, lora: &Path) -> Output {
    let embeds = fixtures().join("learned_embeds.safetensors");
    let adapters = [
        "--lora",
        lora.to_str().unwrap(),
        "--embeds",
        embeds.to_str().unwrap(),
    ];
    run_bin(
        "infer",
        &with_args(infer_args(model, out.to_str().unwrap()), &adapters),
    )
}

fn infer_args<'a>(model: &'a str, out: &'a str) -> Vec<&'a str> {
    let size = ["--width", "64", "--height", "64", "--steps", "2", "--quiet"];
    let mut args = vec!["--model", model, "--prompt", "<v0> with <v1>", "--out", out];
    args.extend(size);
    args
}

/// A NaN in a LoRA, an embeddings or a model weights file is refused at load, naming the
/// file and the tensor; no image is written.
#[test]
fn files_holding_nan_or_infinity_are_refused_by_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_sd();
    let png = tmp.path().join("x.png");
    let png_s = png.to_str().unwrap();
    let embeds = fixtures().join("learned_embeds.safetensors");

    let lora_key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight";
    let lora = tmp.path().join("nan_lora.safetensors");
    poison(
        &fixtures().join("lora_peft.safetensors"),
        lora_key,
        f32::NAN,
        &lora,
    );
    let o = infer_with_lora(&model, &png, &lora);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("nan_lora.safetensors") && err.contains(lora_key),
        "{err}"
    );
    assert!(!png.exists());

    let bad_embeds = tmp.path().join("inf_embeds.safetensors");
    poison(&embeds, "<v1>", f32::INFINITY, &bad_embeds);
    let args = with_args(
        infer_args(&model, png_s),
        &["--embeds", bad_embeds.to_str().unwrap()],
    );
    let err = stderr(&run_bin("infer", &args));
    assert!(
        err.contains("inf_embeds.safetensors") && err.contains("\"<v1>\""),
        "{err}"
    );

    let moved = tmp.path().join("model");
    copy_dir(Path::new(&model), &moved);
    let weights = moved.join("unet/diffusion_pytorch_model.safetensors");
    poison(&weights.clone(), "conv_in.weight", f32::NAN, &weights);
    let args = infer_args(moved.to_str().unwrap(), png_s);
    let o = run_bin("infer", &args);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    // The reader's own message, found as the weight is read, not a misfit's.
    assert!(
        err.contains("diffusion_pytorch_model.safetensors")
            && err.contains("\"conv_in.weight\" holds NaN or infinite values")
            && !err.contains("do not fit"),
        "{err}"
    );
    // A single-file checkpoint: the same, for a fused tensor the loader cuts in three.
    let single = tmp.path().join("single.safetensors");
    let key = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight";
    poison(
        &fixtures().join("single.safetensors"),
        key,
        f32::INFINITY,
        &single,
    );
    let args = with_args(
        infer_args(single.to_str().unwrap(), png_s),
        &["--model-config", &model],
    );
    let o = run_bin("infer", &args);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("single.safetensors")
            && err.contains(&format!("\"{key}\" holds NaN or infinite values")),
        "{err}"
    );
    assert!(!png.exists());
}

/// Finite weights that overflow in the U-Net give NaN latents: `infer` names the likely
/// cause and writes no image.
#[test]
fn infer_writes_no_image_from_non_finite_latents() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, png) = (tiny_sd(), tmp.path().join("x.png"));
    let lora = tmp.path().join("huge.safetensors");
    let key = "unet.mid_block.attentions.0.transformer_blocks.0.ff.net.2.lora_B.weight";
    rewrite(
        &fixtures().join("lora_peft.safetensors"),
        key,
        3e38,
        true,
        &lora,
    );
    let o = infer_with_lora(&model, &png, &lora);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("no image was written") && err.contains("diverged"),
        "{err}"
    );
    assert!(!png.exists());
}

/// A learning rate that blows up: training stops at the first non-finite loss, names the
/// step, the term and the last checkpoint, and everything saved before stays loadable.
#[test]
fn a_diverging_run_stops_and_keeps_its_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let pair = pair_folder(tmp.path(), &PairSpec::training());
    let out = tmp.path().join("out");
    let model = tiny_sd();
    let base = quiet_train_args(pair.to_str().unwrap(), out.to_str().unwrap(), &model);
    let steps = [
        "--warmup-steps",
        "6",
        "--dsbal-steps",
        "2",
        "--checkpoint-every",
        "1",
    ];
    let o = run_bin(
        "train",
        &with_args(with_args(base.clone(), &steps), &["--warmup-lr", "1e4"]),
    );
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    let logged = read_log(&out).len();
    let step = logged + 1;
    assert!(
        err.contains(&format!("diverged at step {step}")) && err.contains("is NaN"),
        "{err}"
    );
    assert!(err.contains("Lower the learning rate"), "{err}");
    let last = format!("step-{logged:06}.safetensors");
    assert!(logged >= 1 && err.contains(&last), "{err}");
    assert!(!out.join("pytorch_lora_weights.safetensors").exists());
    assert!(!out.join(LOCK).exists(), "the lock outlived the run");
    let checkpoints = std::fs::read_dir(out.join("checkpoints")).unwrap().count();
    assert_eq!(
        checkpoints, logged,
        "one checkpoint per finished step, none after"
    );
    // Loading checks every tensor for NaN and infinity.
    for step in 1..=logged {
        let file = out.join(format!("checkpoints/step-{step:06}.safetensors"));
        magictailor::io::checkpoint::load(&file, &Device::Cpu).unwrap();
    }
}

/// In f16 an overflowed step is skipped; 20 in a row stop the run with the way out.
#[test]
fn f16_runs_that_keep_overflowing_stop() {
    let tmp = tempfile::tempdir().unwrap();
    let pair = pair_folder(tmp.path(), &PairSpec::training());
    let out = tmp.path().join("out");
    let model = tiny_sd();
    let base = quiet_train_args(pair.to_str().unwrap(), out.to_str().unwrap(), &model);
    let more = [
        "--warmup-steps",
        "40",
        "--dsbal-steps",
        "0",
        "--dtype",
        "f16",
        "--warmup-lr",
        "1e6",
    ];
    let o = run_bin("train", &with_args(base, &more));
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("overflowed in f16") && err.contains("--dtype f32"),
        "{err}"
    );
    let log = read_log(&out);
    let skipped = log
        .iter()
        .rev()
        .take_while(|l| l["skipped"] == true)
        .count();
    assert_eq!(
        skipped, 19,
        "the 20th skip stops the run before it is logged"
    );
}

/// Spawns `train` and waits until its log has `lines` lines.
fn spawn_train(args: &[&str], out: &Path, lines: usize) -> Child {
    let mut child = bin_command("train", args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while read_log_lines(out) < lines {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "training did not start"
        );
        if let Some(status) = child.try_wait().unwrap() {
            panic!("train ended early: {status}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

fn read_log_lines(out: &Path) -> usize {
    std::fs::read_to_string(out.join("train_log.jsonl")).map_or(0, |t| t.lines().count())
}

fn signal(child: &Child, sig: &str) {
    let pid = child.id().to_string();
    let status = std::process::Command::new("kill")
        .args([sig, &pid])
        .status()
        .unwrap();
    assert!(status.success());
}

fn finish(child: Child) -> Output {
    child.wait_with_output().unwrap()
}

/// A second `train` into a folder in use exits at once naming the holder; the first
/// stops cleanly on SIGTERM and releases the folder.
#[test]
fn one_run_per_output_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let pair = pair_folder(tmp.path(), &PairSpec::training());
    let out = tmp.path().join("out");
    let model = tiny_sd();
    let args = with_args(
        quiet_train_args(pair.to_str().unwrap(), out.to_str().unwrap(), &model),
        &["--warmup-steps", "100000", "--dsbal-steps", "0"],
    );
    let first = spawn_train(&args, &out, 1);
    let o = run_bin("train", &with_args(args.clone(), &["--resume"]));
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    let holder = format!("process {}", first.id());
    assert!(
        err.contains("in use by another magictailor run") && err.contains(&holder),
        "{err}"
    );
    signal(&first, "-TERM");
    let o = finish(first);
    assert_eq!(o.status.code(), Some(143), "{}", stderr(&o));
    assert!(!out.join(LOCK).exists(), "a clean stop releases the folder");
}

/// A lock whose process is gone (a `kill -9`, a crash) is taken over with a warning; a
/// lock from another host is never taken over.
#[test]
fn stale_locks_are_taken_over_and_foreign_ones_are_not() {
    let tmp = tempfile::tempdir().unwrap();
    let pair = pair_folder(tmp.path(), &PairSpec::training());
    let model = tiny_sd();
    let steps = ["--warmup-steps", "1", "--dsbal-steps", "0"];
    let mut dead = std::process::Command::new("true").spawn().unwrap();
    let dead_pid = dead.id();
    dead.wait().unwrap();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();

    let stale = tmp.path().join("stale");
    std::fs::create_dir(&stale).unwrap();
    let lock = format!(r#"{{"host":"{host}","pid":{dead_pid},"started":0}}"#);
    std::fs::write(stale.join(LOCK), lock).unwrap();
    let args = quiet_train_args(pair.to_str().unwrap(), stale.to_str().unwrap(), &model);
    let args: Vec<&str> = args.into_iter().filter(|a| *a != "--quiet").collect();
    let o = run_bin(
        "train",
        &with_args(args, &[steps[0], steps[1], steps[2], steps[3], "--json"]),
    );
    ok(&o);
    assert!(
        stderr(&o).contains("took over the stale lock"),
        "{}",
        stderr(&o)
    );
    assert!(!stale.join(LOCK).exists());

    let foreign = tmp.path().join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    let lock = r#"{"host":"another-node-of-the-cluster","pid":1,"started":0}"#;
    std::fs::write(foreign.join(LOCK), lock).unwrap();
    let args = quiet_train_args(pair.to_str().unwrap(), foreign.to_str().unwrap(), &model);
    let o = run_bin("train", &with_args(args, &steps));
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("another-node-of-the-cluster") && err.contains("delete"),
        "{err}"
    );
    assert!(
        foreign.join(LOCK).exists(),
        "a foreign lock is never removed"
    );
}

/// Ctrl-C stops after the current step with a checkpoint (exit 130), SIGTERM the same
/// (143); `--resume` then gives the same weights as a run never interrupted.
#[test]
fn interrupted_runs_resume_bit_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let pair = pair_folder(tmp.path(), &PairSpec::training());
    let model = tiny_sd();
    let steps = ["--warmup-steps", "60", "--dsbal-steps", "60"];
    let (full, cut) = (tmp.path().join("full"), tmp.path().join("cut"));
    let pair = pair.to_str().unwrap();
    let full_args = with_args(
        quiet_train_args(pair, full.to_str().unwrap(), &model),
        &steps,
    );
    ok(&run_bin("train", &full_args));

    let a = with_args(
        quiet_train_args(pair, cut.to_str().unwrap(), &model),
        &steps,
    );
    let resume = with_args(a.clone(), &["--resume"]);
    for (sig, code, args) in [("-INT", 130, &a), ("-TERM", 143, &resume)] {
        let at = read_log_lines(&cut) + 3;
        let child = spawn_train(args, &cut, at);
        signal(&child, sig);
        let o = finish(child);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(code), "{err}");
        let done = read_log_lines(&cut);
        let saved = cut.join(format!("checkpoints/step-{done:06}.safetensors"));
        assert!(saved.exists(), "{err}");
        assert!(
            err.contains("--resume") && err.contains(&format!("after step {done}")),
            "{err}"
        );
        assert!(
            done < 120,
            "the run finished before the signal: make it longer"
        );
    }
    ok(&run_bin("train", &resume));
    assert!(
        trained_weights(&full) == trained_weights(&cut),
        "resumed weights differ"
    );
    let strip = |p: &Path| {
        read_log(p)
            .into_iter()
            .map(|l| (l["step"].clone(), l["loss"].clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(strip(&full), strip(&cut));
}

/// A second Ctrl-C does not wait for the step to end: the run exits within 2 s, in the
/// middle of a ~6 s step, without the checkpoint a finished step would have saved.
#[test]
fn a_second_ctrl_c_exits_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let pair = pair_folder(tmp.path(), &PairSpec::training());
    let out = tmp.path().join("out");
    let model = tiny_sd();
    // 512 px makes a step take seconds even on the tiny model.
    let mut args = quiet_train_args(pair.to_str().unwrap(), out.to_str().unwrap(), &model);
    set_arg(&mut args, "--resolution", "512");
    let args = with_args(args, &["--warmup-steps", "100000", "--dsbal-steps", "0"]);
    let child = spawn_train(&args, &out, 1);
    signal(&child, "-INT");
    std::thread::sleep(Duration::from_millis(20));
    let t = Instant::now();
    signal(&child, "-INT");
    let o = finish(child);
    assert_eq!(o.status.code(), Some(130), "{}", stderr(&o));
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "took {:?}",
        t.elapsed()
    );
    assert!(
        !out.join("checkpoints").exists(),
        "it waited for the step and saved"
    );
}

/// A `--json` reader that goes away (`| head -1`) does not stop training: the lines are
/// dropped with one note, the run finishes with exit 0 and its log holds every step.
#[test]
fn a_closed_stdout_does_not_stop_training() {
    use std::io::BufRead;
    let tmp = tempfile::tempdir().unwrap();
    let pair = pair_folder(tmp.path(), &PairSpec::training());
    let out = tmp.path().join("out");
    let model = tiny_sd();
    let mut args = quiet_train_args(pair.to_str().unwrap(), out.to_str().unwrap(), &model);
    args.retain(|a| *a != "--quiet");
    let args = with_args(
        args,
        &["--json", "--warmup-steps", "4", "--dsbal-steps", "4"],
    );
    let mut child = bin_command("train", &args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    let mut reader = std::io::BufReader::new(child.stdout.take().unwrap());
    reader.read_line(&mut first).unwrap();
    assert!(first.contains("\"step\":1"), "{first}");
    drop(reader); // the reader is gone while 7 steps are left to report
    let o = finish(child);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(
        err.matches("stdout stopped taking lines").count(),
        1,
        "{err}"
    );
    assert_eq!(read_log_lines(&out), 8);
    assert!(out.join("magictailor.json").is_file());
}

/// Trains 4 + 4 steps with a checkpoint every 3 (steps 3, 4 and 6) into `root/full`; gives
/// that folder, `root/cut` and the arguments of the same run into `root/cut`.
fn reference_run(root: &Path) -> (PathBuf, PathBuf, Vec<String>) {
    let pair = pair_folder(root, &PairSpec::training());
    let model = tiny_sd();
    let (full, cut) = (root.join("full"), root.join("cut"));
    let args = |out: &Path| -> Vec<String> {
        let args = short_run_args(pair.to_str().unwrap(), out.to_str().unwrap(), &model);
        args.into_iter().map(String::from).collect()
    };
    let full_args = args(&full);
    ok(&run_bin(
        "train",
        &full_args.iter().map(String::as_str).collect::<Vec<_>>(),
    ));
    let cut_args = args(&cut);
    (full, cut, cut_args)
}

/// SIGKILL in the middle of writing a checkpoint leaves its temporary file; the next run
/// that claims the folder (here `--resume`) removes it, says so, and still ends with the
/// weights of an uninterrupted run. A test hook (debug builds) stalls the write half-way.
#[test]
fn a_writer_killed_mid_write_leaves_a_temp_file_the_next_run_removes() {
    let tmp = tempfile::tempdir().unwrap();
    let (full, cut, args) = reference_run(tmp.path());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut child = bin_command("train", &args)
        .env("MAGICTAILOR_TEST_STALL_WRITE", "step-000006")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let ckpts = cut.join("checkpoints");
    let temp = |d: &Path| -> Option<std::path::PathBuf> {
        let entries = std::fs::read_dir(d).ok()?;
        (entries.flatten()).map(|e| e.path()).find(|p| {
            p.to_string_lossy()
                .contains(".step-000006.safetensors.tmp.")
        })
    };
    let start = Instant::now();
    let leftover = loop {
        if let Some(p) = temp(&ckpts).filter(|p| p.metadata().is_ok_and(|m| m.len() > 0)) {
            break p;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no stalled write"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "train ended before the stall"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(leftover.exists(), "the kill leaves the temporary file");

    let mut resume = with_args(args, &["--resume"]);
    resume.retain(|a| *a != "--quiet");
    let o = run_bin("train", &resume);
    ok(&o);
    assert!(!leftover.exists(), "the next run removed it");
    assert!(
        stderr(&o).contains("removed 1 temporary file(s) a killed run left"),
        "{}",
        stderr(&o)
    );
    assert!(temp(&ckpts).is_none());
    assert!(
        trained_weights(&full) == trained_weights(&cut),
        "resumed weights differ"
    );
}

/// `file` rewritten with tensor `key` as integers (its values rounded).
fn as_integers(file: &Path, key: &str, dtype: candle_core::DType, out: &Path) {
    let mut tensors: HashMap<String, Tensor> =
        candle_core::safetensors::load(file, &Device::Cpu).unwrap();
    let t = tensors[key].to_dtype(dtype).unwrap();
    tensors.insert(key.to_string(), t);
    candle_core::safetensors::save(&tensors, out).unwrap();
}

/// Integer tensors where floats belong (embeddings, LoRA, checkpoints) are refused,
/// naming the file, the tensor and its dtype, before anything is written; a checkpoint's
/// step counts stay integers.
#[test]
fn integer_tensors_in_float_files_are_refused_by_name() {
    use candle_core::DType;
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_sd();
    let png = tmp.path().join("x.png");

    let embeds = tmp.path().join("int_embeds.safetensors");
    as_integers(
        &fixtures().join("learned_embeds.safetensors"),
        "<v0>",
        DType::I64,
        &embeds,
    );
    let args = with_args(
        infer_args(&model, png.to_str().unwrap()),
        &["--embeds", embeds.to_str().unwrap()],
    );
    let o = run_bin("infer", &args);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("int_embeds.safetensors") && err.contains("\"<v0>\" holds i64"),
        "{err}"
    );
    assert!(!png.exists());

    let key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight";
    let lora = tmp.path().join("int_lora.safetensors");
    as_integers(
        &fixtures().join("lora_peft.safetensors"),
        key,
        DType::U8,
        &lora,
    );
    let o = infer_with_lora(&model, &png, &lora);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("int_lora.safetensors") && err.contains(key) && err.contains("u8"),
        "{err}"
    );
    assert!(!png.exists());

    let ckpt = tmp.path().join("step-000001.safetensors");
    let mut t = HashMap::new();
    t.insert("step".to_string(), Tensor::new(1u32, &Device::Cpu).unwrap());
    t.insert(
        "rows".to_string(),
        Tensor::new(&[1i64, 2], &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&t, &ckpt).unwrap();
    let e = magictailor::io::checkpoint::load(&ckpt, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("\"rows\" holds i64"), "{e}");
    t.insert(
        "rows".to_string(),
        Tensor::new(&[1f32, 2.], &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&t, &ckpt).unwrap();
    assert!(
        magictailor::io::checkpoint::load(&ckpt, &Device::Cpu).is_ok(),
        "step stays u32"
    );
}

/// An I/O error after the first checkpoint (here a full disk while writing the second,
/// through a test hook) names what survived and the command that continues from it; that
/// command then finishes with the weights of an uninterrupted run.
#[test]
fn a_full_disk_names_the_last_good_checkpoint_and_the_way_on() {
    let tmp = tempfile::tempdir().unwrap();
    let (full, cut, args) = reference_run(tmp.path());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = bin_command("train", &args)
        .env("MAGICTAILOR_TEST_FULL_DISK", "step-000006")
        .output()
        .unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    let last = cut.join("checkpoints/step-000004.safetensors");
    for needle in [
        "cannot write",
        "step-000006.safetensors",
        "No space left on device",
        &format!("the last good checkpoint is {}", last.display()),
        "Nothing up to step 4 is lost",
        "plus --resume",
    ] {
        assert!(err.contains(needle), "{needle:?} in {err}");
    }
    ok(&run_bin("train", &with_args(args, &["--resume"])));
    assert!(
        trained_weights(&full) == trained_weights(&cut),
        "resumed weights differ"
    );
}
