//! One training step against a PyTorch/peft computation of the same formulas on the same
//! tiny model of each base family (scripts/make_parity_fixtures.py, `training_step_fixture`): the warm-up
//! step's loss terms and the gradients of every LoRA matrix and of the pseudo-word rows,
//! and the DS-Bal step's per-sample losses, chosen sample, L_diff-max and L_pres.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::*;
use magictailor::model::loader::StableDiffusion;
use magictailor::model::lora::{LoraModule, LoraSet, TrainableLora};
use magictailor::train::method::LossWeights;
use magictailor::train::objective::{step_losses, Batch, Noised, Online, TextParams};

fn scalar(t: &Tensor) -> f32 {
    t.to_dtype(DType::F32).unwrap().to_scalar::<f32>().unwrap()
}

fn usizes(t: &Tensor) -> Vec<usize> {
    t.to_dtype(DType::U32)
        .unwrap()
        .to_vec1::<u32>()
        .unwrap()
        .into_iter()
        .map(|x| x as usize)
        .collect()
}

#[test]
fn warm_up_and_ds_bal_steps_match_pytorch() {
    for fam in &FAMILIES {
        steps_match_pytorch(fam);
    }
}

fn steps_match_pytorch(fam: &Family) {
    let dev = Device::Cpu;
    let r = candle_core::safetensors::load(fam.path("train_step.safetensors"), &dev).unwrap();
    let mut sd = StableDiffusion::load(&fam.model(), &dev, DType::F32).unwrap();
    sd.tokenizer
        .add_pseudo_words(&["<v0>".into(), "<v1>".into()])
        .unwrap();

    // The same prompts tokenize to the same ids, pseudo-words where the reference has them.
    let prompts = ["A photo of <v0>", "A photo of <v0>", "A photo of <v1>"];
    let ids: Vec<u32> = prompts
        .iter()
        .flat_map(|p| sd.tokenizer.encode(p).unwrap())
        .collect();
    let ids = Tensor::from_vec(ids, (3, 77), &dev).unwrap();
    assert_eq!(
        ids.to_vec2::<u32>().unwrap(),
        r["ids"]
            .to_dtype(DType::U32)
            .unwrap()
            .to_vec2::<u32>()
            .unwrap()
    );
    let batch = Batch {
        pixels: Tensor::zeros(1, DType::F32, &dev).unwrap(), // unused: latents are given
        masks: r["masks"].clone(),
        ids,
        ids_2: None,
        token_pos: usizes(&r["token_pos"]),
        sample_of: usizes(&r["sample_of"]),
        n_samples: 2,
        roi: None,
        prior: 0,
        reference: None,
        posterior: None,
    };
    let noised = Noised {
        z_t: r["z_t"].clone(),
        eps: r["eps"].clone(),
        target: r["eps"].clone(),
        timesteps: usizes(&r["t"]),
        masks: r["masks"].clone(),
        reference: None,
    };

    // Online adapters = the fixture LoRA, as trainable Vars; rows = the fixture embeddings.
    let targets = sd.unet.lora_targets();
    let fixture_lora = LoraSet::load(&fam.path("lora_peft.safetensors"), &targets, &dev).unwrap();
    let lora = TrainableLora::new(&targets, 4, 8.0, 0, &dev, DType::F32).unwrap();
    for LoraModule { path, a, b } in &lora.modules {
        let w = fixture_lora.get(path).unwrap();
        a.set(&w.a).unwrap();
        b.set(&w.b).unwrap();
    }
    let embeds =
        magictailor::io::embeds::load(&fam.path("learned_embeds.safetensors"), 32, &dev).unwrap();
    let rows = Var::from_tensor(&Tensor::stack(&[&embeds[0].1, &embeds[1].1], 0).unwrap()).unwrap();
    let w = LossWeights {
        lambda_attn: 0.01,
        lambda_pres: 0.2,
        clic: None,
        prior: 0.0,
        vico_reg: None,
        attn_summed: false,
    };

    let text = TextParams {
        rows: rows.as_tensor(),
        table: None,
        rows_2: None,
        table_2: None,
    };
    let losses = |m: Option<&LoraSet>| {
        step_losses(
            &sd,
            &batch,
            &noised,
            Online::lora(&lora.as_set()),
            text,
            m,
            w,
        )
        .unwrap()
    };

    // Warm-up step.
    let warm = losses(None);
    let d_img = max_abs_diff(&warm.per_image, &r["per_image"]);
    let d_attn = (scalar(&warm.l_attn) - scalar(&r["l_attn"])).abs();
    let d_loss = (scalar(&warm.loss) - scalar(&r["loss"])).abs();
    assert!(
        d_img < 1e-6 && d_attn < 1e-5 && d_loss < 1e-6,
        "{}: per-image {d_img}, L_attn {d_attn}, loss {d_loss}",
        fam.name
    );
    let grads = warm.loss.backward().unwrap();
    let mut worst = 0f32;
    for LoraModule { path, a, b } in &lora.modules {
        for (var, which) in [(a, "A"), (b, "B")] {
            // SD 1.x's 1x1-conv projections: peft's adapters are [r, in, 1, 1], ours 2-D.
            let want = r[&format!("grad.{path}.{which}")]
                .reshape(var.dims())
                .unwrap();
            let want = &want;
            let got = grads.get(var.as_tensor()).unwrap();
            // Floor: the mid block's self-attention sees one token, so its q/k
            // gradients are exactly 0 in PyTorch and ~1e-12 rounding noise here.
            let rel = max_abs_diff(got, want) / max_abs(want).max(1e-6);
            worst = worst.max(rel);
        }
    }
    assert!(
        worst < 1e-4,
        "{}: worst LoRA gradient error relative to its largest entry: {worst}",
        fam.name
    );
    let rows_grad = grads.get(rows.as_tensor()).unwrap();
    let rel = max_abs_diff(rows_grad, &r["grad.rows"]) / max_abs(&r["grad.rows"]);
    assert!(
        rel < 1e-5,
        "{}: pseudo-word row gradient relative error {rel}",
        fam.name
    );

    // DS-Bal step against the fixture momentum adapters.
    let momentum = LoraSet::load(&fam.path("lora_momentum.safetensors"), &targets, &dev).unwrap();
    let ds = losses(Some(&momentum));
    assert!(max_abs_diff(&ds.per_sample, &r["per_sample"]) < 1e-6);
    assert_eq!(
        ds.chosen,
        Some(usizes(&r["chosen"].unsqueeze(0).unwrap())[0])
    );
    let d_max = (scalar(&ds.l_diff) - scalar(&r["l_diff_max"])).abs();
    let d_pres = (scalar(&ds.l_pres) - scalar(&r["l_pres"])).abs() / scalar(&r["l_pres"]);
    assert!(
        d_max < 1e-6 && d_pres < 2e-5,
        "{}: L_diff-max {d_max}, L_pres relative {d_pres}",
        fam.name
    );
    eprintln!("{}: warm-up: per-image {d_img:e}, L_attn {d_attn:e}, loss {d_loss:e}; grads: LoRA {worst:e}, rows {rel:e}; DS-Bal: L_max {d_max:e}, L_pres rel {d_pres:e}", fam.name);
}
