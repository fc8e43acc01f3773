use std::time::Instant;
use berth_embedding::config::ModelsConfig;
use berth_embedding::model::{self, ModelFiles};

fn main() {
    let models = ModelsConfig::default();
    model::load_runtime(&models.ort_library()).unwrap();
    let source = &models.sources()[0];
    let files = ModelFiles::read(source).unwrap();
    let (mut session, _) = files.session(1).unwrap();
    let tokenizer = session.tokenizer().clone();
    let word = "berth measures the energy of inference servers ";
    for (count, len) in [(1usize, 10usize), (1, 100), (8, 50), (32, 50), (32, 200), (32, 1000), (64, 1200), (128, 1200), (256, 60), (2048, 30)] {
        let text: String = word.repeat(len / word.len() + 1)[..len].to_string();
        let texts: Vec<&str> = vec![text.as_str(); count];
        let started = Instant::now();
        let out = session.embed(&texts).unwrap();
        let secs = started.elapsed().as_secs_f64();
        let tokens: u64 = out.iter().map(|p| u64::from(p.tokens)).sum();
        let t0 = Instant::now();
        let mut counted = 0usize;
        for t in &texts { counted += tokenizer.encode(*t, true).unwrap().get_attention_mask().iter().filter(|&&m| m != 0).count(); }
        let tok_secs = t0.elapsed().as_secs_f64();
        println!("{count} x {len} B: {tokens} tokens in {:.1} ms = {:.0} tok/s; tokenize {counted} in {:.2} ms ({:.1} MB/s)", secs*1e3, tokens as f64/secs, tok_secs*1e3, (count*len) as f64/tok_secs/1e6);
    }
}
