//! Training you can watch: sample grids, the loss plot and TensorBoard event files, on the
//! tiny model. Sampling must not change what is trained.

mod common;

use std::path::Path;

use common::*;
use magictailor::preview::tensorboard::masked_crc;

/// 3 warm-up + 2 DS-Bal steps at 64 px, sample grids every 2 steps with 5 DDIM steps.
fn watched_args<'a>(pair: &'a str, out: &'a str, model: &'a str) -> Vec<&'a str> {
    let mut args = quiet_train_args(pair, out, model);
    args.extend([
        "--warmup-steps",
        "3",
        "--dsbal-steps",
        "2",
        "--sample-steps",
        "5",
    ]);
    args.extend(["--sample-every", "2", "--tensorboard"]);
    args
}

/// Grids at steps 2, 3 (the switch), 4 and 5 (the end), each 4 prompts x 2 seeds; the
/// weights equal a run without sampling; the loss plot is a 960x540 PNG; the run record
/// lists them all.
#[test]
fn sampling_draws_grids_and_changes_no_weight() {
    let tmp = tempfile::tempdir().unwrap();
    let pair = pair_folder(tmp.path(), &PairSpec::training());
    let (model, pair) = (tiny_sd(), pair.to_str().unwrap().to_string());
    let (on, off) = (tmp.path().join("on"), tmp.path().join("off"));
    ok(&run_bin(
        "train",
        &watched_args(&pair, on.to_str().unwrap(), &model),
    ));
    let mut plain = watched_args(&pair, off.to_str().unwrap(), &model);
    set_arg(&mut plain, "--sample-every", "0");
    ok(&run_bin("train", &plain));
    assert!(
        trained_weights(&on) == trained_weights(&off),
        "sampling changed the trained weights"
    );
    assert!(!off.join("samples").exists());

    let grids: Vec<String> = std::fs::read_dir(on.join("samples"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let want = [
        "step-000002.png",
        "step-000003.png",
        "step-000004.png",
        "step-000005.png",
    ];
    assert_eq!(grids, want);
    // 2 columns of 64 px fit in the minimum width 420; 4 rows of (20 px label + 64 px),
    // 3 gaps of 4, a 26 px title, a 20 px header and 8 px margins.
    let grid = read_png(&on.join("samples/step-000005.png"));
    assert_eq!(grid.dimensions(), (420, 16 + 26 + 20 + 4 * 84 + 12));

    let timed: Vec<u64> = (read_log(&on).iter())
        .filter(|l| l["sample_seconds"].as_f64().is_some_and(|s| s > 0.0))
        .map(|l| l["step"].as_u64().unwrap())
        .collect();
    assert_eq!(
        timed,
        [2, 3, 4, 5],
        "sampling time is logged on the sampled steps"
    );
    assert!(read_log(&off)
        .iter()
        .all(|l| l.get("sample_seconds").is_none()));

    assert_eq!(read_png(&on.join("loss.png")).dimensions(), (960, 540));
    let record: serde_json::Value =
        serde_json::from_slice(&read_bytes(&on.join("magictailor.json"))).unwrap();
    let previews: Vec<&str> = (record["previews"].as_array().unwrap().iter())
        .map(|p| p.as_str().unwrap())
        .collect();
    assert!(previews.contains(&"samples/step-000005.png") && previews.contains(&"loss.png"));
    assert!(previews.contains(&"tb/"));
}

/// The last grid's cell (prompt, seed) is exactly what `infer --seed` draws from the
/// finished folder: the grids go through inference's own code.
#[test]
fn a_grid_cell_is_what_infer_draws() {
    let tmp = tempfile::tempdir().unwrap();
    let pair = pair_folder(tmp.path(), &PairSpec::training());
    let (model, out) = (tiny_sd(), tmp.path().join("run"));
    let args = watched_args(pair.to_str().unwrap(), out.to_str().unwrap(), &model);
    ok(&run_bin("train", &args));
    let png = tmp.path().join("x.png");
    let infer = [
        "--model-dir",
        out.to_str().unwrap(),
        "--prompt",
        "<v0> with <v1>",
        "--seed",
        "1",
        "--steps",
        "5",
        "--width",
        "64",
        "--height",
        "64",
        "--out",
        png.to_str().unwrap(),
        "--quiet",
    ];
    ok(&run_bin("infer", &infer));
    let drawn = read_png(&png);
    let grid = read_png(&out.join("samples/step-000005.png"));
    // Row 2 ("<v0> with <v1>"), column 1 (seed 1).
    let (x, y) = (8 + 64 + 4, 8 + 26 + 20 + 2 * (20 + 64 + 4) + 20);
    let cell = image::imageops::crop_imm(&grid, x, y, 64, 64).to_image();
    assert_eq!(png_max_diff(&cell, &drawn), 0);
}

/// Reads a TFRecord file, checking both CRCs of every record.
fn records(file: &Path) -> Vec<Vec<u8>> {
    let bytes = read_bytes(file);
    let (mut at, mut out) = (0, Vec::new());
    while at < bytes.len() {
        let len_bytes = &bytes[at..at + 8];
        let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap());
        assert_eq!(crc, masked_crc(len_bytes), "length CRC");
        let data = &bytes[at + 12..at + 12 + len];
        let crc = u32::from_le_bytes(bytes[at + 12 + len..at + 16 + len].try_into().unwrap());
        assert_eq!(crc, masked_crc(data), "data CRC");
        out.push(data.to_vec());
        at += 16 + len;
    }
    out
}

/// (field number, wire type, payload) of a protobuf message's top-level fields.
fn fields(mut b: &[u8]) -> Vec<(u64, u8, Vec<u8>)> {
    fn varint(b: &mut &[u8]) -> u64 {
        let (mut v, mut shift) = (0u64, 0);
        loop {
            let byte = b[0];
            *b = &b[1..];
            v |= ((byte & 0x7F) as u64) << shift;
            if byte < 0x80 {
                return v;
            }
            shift += 7;
        }
    }
    let mut out = Vec::new();
    while !b.is_empty() {
        let key = varint(&mut b);
        let (field, wire) = (key >> 3, (key & 7) as u8);
        let payload = match wire {
            0 => varint(&mut b).to_le_bytes().to_vec(),
            1 => {
                let (p, rest) = b.split_at(8);
                b = rest;
                p.to_vec()
            }
            2 => {
                let n = varint(&mut b) as usize;
                let (p, rest) = b.split_at(n);
                b = rest;
                p.to_vec()
            }
            5 => {
                let (p, rest) = b.split_at(4);
                b = rest;
                p.to_vec()
            }
            w => panic!("wire type {w}"),
        };
        out.push((field, wire, payload));
    }
    out
}

fn field(msg: &[(u64, u8, Vec<u8>)], n: u64) -> Option<&Vec<u8>> {
    msg.iter().find(|f| f.0 == n).map(|f| &f.2)
}

/// The event file reads back: a version record, then per step the loss scalars (equal to
/// the log's), and the grids as PNG images of the right size.
#[test]
fn tensorboard_events_read_back() {
    let tmp = tempfile::tempdir().unwrap();
    let pair = pair_folder(tmp.path(), &PairSpec::training());
    let (model, out) = (tiny_sd(), tmp.path().join("run"));
    ok(&run_bin(
        "train",
        &watched_args(pair.to_str().unwrap(), out.to_str().unwrap(), &model),
    ));
    let files: Vec<_> = std::fs::read_dir(out.join("tb"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1);
    assert!(files[0]
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .starts_with("events.out.tfevents."));
    let events: Vec<_> = records(&files[0]).iter().map(|r| fields(r)).collect();
    assert_eq!(field(&events[0], 3).unwrap(), b"brain.Event:2");

    let log = read_log(&out);
    let (mut losses, mut images) = (Vec::new(), Vec::new());
    for e in &events[1..] {
        let step = u64::from_le_bytes(field(e, 2).unwrap()[..8].try_into().unwrap());
        let value = fields(field(&fields(field(e, 5).unwrap()), 1).unwrap());
        let tag = String::from_utf8(field(&value, 1).unwrap().clone()).unwrap();
        if tag == "loss/total" {
            let v = f32::from_le_bytes(field(&value, 2).unwrap()[..4].try_into().unwrap());
            losses.push((step, v));
        }
        if let Some(img) = field(&value, 4) {
            let img = fields(img);
            let png = image::load_from_memory(field(&img, 4).unwrap()).unwrap();
            let h = u64::from_le_bytes(field(&img, 1).unwrap()[..8].try_into().unwrap());
            assert_eq!(png.height() as u64, h);
            images.push((tag, step));
        }
    }
    let want: Vec<(u64, f32)> = (log.iter())
        .map(|l| {
            (
                l["step"].as_u64().unwrap(),
                l["loss"].as_f64().unwrap() as f32,
            )
        })
        .collect();
    assert_eq!(losses, want);
    let grid_steps: Vec<u64> = images.iter().map(|i| i.1).collect();
    assert_eq!(grid_steps, [2, 3, 4, 5]);
}

/// Bad sample settings are refused before anything is written.
#[test]
fn bad_sample_prompts_are_refused_before_training() {
    let tmp = tempfile::tempdir().unwrap();
    let pair = pair_folder(tmp.path(), &PairSpec::training());
    let (model, out) = (tiny_sd(), tmp.path().join("run"));
    let empty = tmp.path().join("prompts.txt");
    std::fs::write(&empty, "\n  \n").unwrap();
    let args = watched_args(pair.to_str().unwrap(), out.to_str().unwrap(), &model);
    let o = run_bin(
        "train",
        &[
            args.clone(),
            vec!["--sample-prompts", empty.to_str().unwrap()],
        ]
        .concat(),
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("prompts.txt") && stderr(&o).contains("no prompts"),
        "{}",
        stderr(&o)
    );

    let unknown = tmp.path().join("unknown.txt");
    std::fs::write(&unknown, "<v0> with <v1>\n<v2> in the snow\n").unwrap();
    let o = run_bin(
        "train",
        &[args, vec!["--sample-prompts", unknown.to_str().unwrap()]].concat(),
    );
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(
        err.contains("<v2> in the snow") && err.contains("<v0>, <v1>"),
        "{err}"
    );
    assert!(!out.exists(), "nothing may be written");
}

/// Off a terminal (here stderr is a pipe, as under Slurm, nohup or CI) progress comes as
/// plain lines: after the first unit, at the cadence, and at the end, each with the
/// position, the losses (train), the rate and the time left.
#[test]
fn progress_off_a_terminal_comes_as_plain_lines() {
    let tmp = tempfile::tempdir().unwrap();
    let pair = pair_folder(tmp.path(), &PairSpec::training());
    let (out, model) = (tmp.path().join("out"), tiny_sd());
    let mut args = quiet_train_args(pair.to_str().unwrap(), out.to_str().unwrap(), &model);
    args.retain(|a| *a != "--quiet");
    args.extend([
        "--warmup-steps",
        "12",
        "--dsbal-steps",
        "3",
        "--sample-every",
        "0",
    ]);
    let o = bin_command("train", &args)
        .env("MAGICTAILOR_LOG_EVERY_SECONDS", "0")
        .output()
        .unwrap();
    ok(&o);
    let err = stderr(&o);
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("step ")).collect();
    assert_eq!(lines.len(), 3, "steps 1, 11 and 15 (every 10 steps): {err}");
    assert!(
        lines[0].starts_with("step 1/15 (7%) warm-up loss "),
        "{err}"
    );
    assert!(lines[1].starts_with("step 11/15 "), "{err}");
    assert!(
        lines[2].starts_with("step 15/15 (100%) ds-bal loss "),
        "{err}"
    );
    for l in &lines {
        assert!(
            l.contains("(diff ") && l.contains(" | ") && l.ends_with(" left"),
            "{l}"
        );
    }

    let png = tmp.path().join("x.png");
    let infer = [
        "--model",
        &model,
        "--prompt",
        "a dog",
        "--width",
        "64",
        "--height",
        "64",
        "--steps",
        "12",
        "--out",
        png.to_str().unwrap(),
    ];
    let o = bin_command("infer", &infer)
        .env("MAGICTAILOR_LOG_EVERY_SECONDS", "0")
        .output()
        .unwrap();
    ok(&o);
    let err = stderr(&o);
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("denoising "))
        .collect();
    assert_eq!(lines.len(), 3, "{err}");
    assert!(lines[2].starts_with("denoising 12/12 (100%) | "), "{err}");
}
