//! Tiny llama models with random weights that tests write themselves.

use anyhow::Result;
use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// A tiny model's dimensions.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub hidden: usize,
    pub ff: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub blocks: usize,
    pub vocab: usize,
}

/// A small deterministic pseudo-random tensor.
pub fn rand_tensor(shape: &[usize], seed: u64, scale: f32) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale
        })
        .collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

/// Writes a tiny llama GGUF of `shape` with random weights of type `dtype`
/// (norms in f32), attention norm weights drawn from `[-attn_norm,
/// attn_norm]` (1 for an ordinary model).
pub fn write_gguf(path: &Path, shape: &Shape, dtype: GgmlDType, attn_norm: f32) -> Result<()> {
    let Shape {
        hidden,
        ff,
        heads,
        kv_heads,
        blocks,
        vocab,
    } = *shape;
    use gguf_file::Value as V;
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut seed = 1;
    let mut q = |name: String,
                 shape: &[usize],
                 dtype: GgmlDType,
                 scale: f32|
     -> Result<(String, QTensor)> {
        seed += 1;
        let t = rand_tensor(shape, seed, scale)?;
        Ok((name, QTensor::quantize(&t, dtype)?))
    };
    let kv = kv_heads * hidden / heads;
    tensors.push(q("token_embd.weight".into(), &[vocab, hidden], dtype, 1.0)?);
    tensors.push(q(
        "output_norm.weight".into(),
        &[hidden],
        GgmlDType::F32,
        1.0,
    )?);
    for i in 0..blocks {
        let p = format!("blk.{i}");
        tensors.push(q(
            format!("{p}.attn_norm.weight"),
            &[hidden],
            GgmlDType::F32,
            attn_norm,
        )?);
        tensors.push(q(
            format!("{p}.ffn_norm.weight"),
            &[hidden],
            GgmlDType::F32,
            1.0,
        )?);
        tensors.push(q(
            format!("{p}.attn_q.weight"),
            &[hidden, hidden],
            dtype,
            0.2,
        )?);
        tensors.push(q(format!("{p}.attn_k.weight"), &[kv, hidden], dtype, 0.2)?);
        tensors.push(q(format!("{p}.attn_v.weight"), &[kv, hidden], dtype, 0.2)?);
        tensors.push(q(
            format!("{p}.attn_output.weight"),
            &[hidden, hidden],
            dtype,
            0.2,
        )?);
        tensors.push(q(
            format!("{p}.ffn_gate.weight"),
            &[ff, hidden],
            dtype,
            0.2,
        )?);
        tensors.push(q(format!("{p}.ffn_up.weight"), &[ff, hidden], dtype, 0.2)?);
        tensors.push(q(
            format!("{p}.ffn_down.weight"),
            &[hidden, ff],
            dtype,
            0.2,
        )?);
    }
    let md: Vec<(&str, V)> = vec![
        ("general.architecture", V::String("llama".into())),
        ("general.name", V::String("tiny".into())),
        ("llama.attention.head_count", V::U32(heads as u32)),
        ("llama.attention.head_count_kv", V::U32(kv_heads as u32)),
        ("llama.block_count", V::U32(blocks as u32)),
        ("llama.embedding_length", V::U32(hidden as u32)),
        ("llama.feed_forward_length", V::U32(ff as u32)),
        (
            "llama.rope.dimension_count",
            V::U32((hidden / heads) as u32),
        ),
        ("llama.attention.layer_norm_rms_epsilon", V::F32(1e-5)),
        ("llama.rope.freq_base", V::F32(10000.0)),
        ("llama.context_length", V::U32(256)),
    ];
    let mut f = std::fs::File::create(path)?;
    let md_refs: Vec<(&str, &V)> = md.iter().map(|(k, v)| (*k, v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut f, &md_refs, &t_refs)?;
    Ok(())
}

/// Writes a tiny llama safetensors model of `shape` into `dir`
/// (`model.safetensors` and `config.json`) with random weights in `dtype`.
pub fn write_safetensors(dir: &Path, shape: &Shape, dtype: DType) -> Result<()> {
    let Shape {
        hidden,
        ff,
        heads,
        kv_heads,
        blocks,
        vocab,
    } = *shape;
    let kv = kv_heads * hidden / heads;
    let mut map: HashMap<String, Tensor> = HashMap::new();
    let mut seed = 100;
    let mut add = |name: String, shape: &[usize], scale: f32| -> Result<()> {
        seed += 1;
        map.insert(name, rand_tensor(shape, seed, scale)?.to_dtype(dtype)?);
        Ok(())
    };
    add("model.embed_tokens.weight".into(), &[vocab, hidden], 1.0)?;
    add("model.norm.weight".into(), &[hidden], 1.0)?;
    add("lm_head.weight".into(), &[vocab, hidden], 0.5)?;
    for i in 0..blocks {
        let p = format!("model.layers.{i}");
        add(format!("{p}.input_layernorm.weight"), &[hidden], 1.0)?;
        add(
            format!("{p}.post_attention_layernorm.weight"),
            &[hidden],
            1.0,
        )?;
        add(
            format!("{p}.self_attn.q_proj.weight"),
            &[hidden, hidden],
            0.2,
        )?;
        add(format!("{p}.self_attn.k_proj.weight"), &[kv, hidden], 0.2)?;
        add(format!("{p}.self_attn.v_proj.weight"), &[kv, hidden], 0.2)?;
        add(
            format!("{p}.self_attn.o_proj.weight"),
            &[hidden, hidden],
            0.2,
        )?;
        add(format!("{p}.mlp.gate_proj.weight"), &[ff, hidden], 0.2)?;
        add(format!("{p}.mlp.up_proj.weight"), &[ff, hidden], 0.2)?;
        add(format!("{p}.mlp.down_proj.weight"), &[hidden, ff], 0.2)?;
    }
    candle_core::safetensors::save(&map, dir.join("model.safetensors"))?;
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hidden, "intermediate_size": ff,
        "num_hidden_layers": blocks, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "vocab_size": vocab,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 256,
        "tie_word_embeddings": false
    });
    std::fs::write(dir.join("config.json"), config.to_string())?;
    Ok(())
}
