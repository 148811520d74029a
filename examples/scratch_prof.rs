use candle_core::{DType, Device, Tensor};
use magictailor::infer::seeded_normal;
use magictailor::model::loader::StableDiffusion;
use magictailor::model::lora::TrainableLora;
use magictailor::model::nn::Ctx;
use std::time::Instant;
fn main() {
    let dev = Device::Cpu;
    let dir = std::env::temp_dir().join("scratch-mid");
    if !dir.exists() {
        magictailor::tiny::write_with(
            &dir,
            0,
            &magictailor::tiny::mid_unet_config(),
            &magictailor::tiny::vae_config(),
            &magictailor::tiny::mid_text_encoder_config(),
        )
        .unwrap();
    }
    let sd = StableDiffusion::load(dir.to_str().unwrap(), &dev, DType::F32).unwrap();
    let lora = TrainableLora::new(&sd.unet.lora_targets(), 32, 32.0, 0, &dev, DType::F32).unwrap();
    let ctx6 = seeded_normal(1, (6, 77, 256), &dev).unwrap();
    let x6 = seeded_normal(2, (6, 4, 32, 32), &dev).unwrap();
    let t6 = Tensor::new(&[10f32, 200., 400., 600., 800., 990.], &dev).unwrap();
    for _ in 0..4 {
        let set = lora.as_set();
        let t0 = Instant::now();
        let out = sd
            .unet
            .forward(
                &x6,
                &t6,
                &ctx6,
                Ctx {
                    lora: Some(&set),
                    probe: None,
                },
            )
            .unwrap();
        let loss = out.sqr().unwrap().mean_all().unwrap();
        let t1 = Instant::now();
        let grads = loss.backward().unwrap();
        let t2 = Instant::now();
        println!(
            "fwd {:.3} bwd {:.3} entries {}",
            (t1 - t0).as_secs_f64(),
            (t2 - t1).as_secs_f64(),
            grads.get_ids().count()
        );
    }
}
