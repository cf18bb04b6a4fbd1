// llama.cpp's greedy continuation of a prompt, as JSON on stdout: loads a GGUF with libllama,
// tokenizes the prompt with the file's own tokenizer (special tokens as the file says: BOS if
// `add_bos_token`), decodes it, then N times takes the argmax of the last logits (the lowest
// id on an exact tie) and decodes that token. For each step it also prints the top-2 logit
// margin, so a reader can tell a clear choice from a near tie, and the whole logit vector of
// every step (the logits each chosen token was the argmax of).
//
// With a fifth argument `exact`, the context keeps its KV cache in f32 and does not use flash
// attention: then the only coarse rounding of activations left is the Q8_K quantization of
// the K-quant dot products' inputs, and tandem's logits can be compared with these to f32
// precision. Without it, llama.cpp's defaults: f16 KV cache, flash attention `auto` (on for
// the CPU backend; with it, an f32 cache gives the same logits as the f16 one).
//
//   cc -O2 -I$LL/include -I$LL/ggml/include scripts/llama_greedy.c -L$BIN -lllama -o llama_greedy
//   LD_LIBRARY_PATH=$BIN ./llama_greedy MODEL.gguf N THREADS "prompt text" [exact]
#include "llama.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static bool no_progress(float progress, void *user) { (void)progress; (void)user; return true; }

static void quiet(enum ggml_log_level level, const char *text, void *user) {
    (void)user;
    if (level >= GGML_LOG_LEVEL_ERROR) fputs(text, stderr);
}

int main(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: llama_greedy MODEL N THREADS PROMPT [exact]\n");
        return 2;
    }
    int n = atoi(argv[2]);
    int th = atoi(argv[3]);
    const char *prompt = argv[4];
    llama_log_set(quiet, NULL);
    llama_backend_init();
    struct llama_model_params mp = llama_model_default_params();
    mp.progress_callback = no_progress;
    struct llama_model *m = llama_model_load_from_file(argv[1], mp);
    if (!m) { fprintf(stderr, "load failed\n"); return 1; }
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 256; cp.n_batch = 256; cp.n_threads = th; cp.n_threads_batch = th;
    int exact = argc > 5 && strcmp(argv[5], "exact") == 0;
    if (exact) {
        cp.type_k = GGML_TYPE_F32;
        cp.type_v = GGML_TYPE_F32;
        cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    }
    struct llama_context *c = llama_init_from_model(m, cp);
    if (!c) { fprintf(stderr, "context failed\n"); return 1; }
    const struct llama_vocab *v = llama_model_get_vocab(m);
    llama_token toks[256];
    int nt = llama_tokenize(v, prompt, (int)strlen(prompt), toks, 256, true, false);
    if (nt <= 0) { fprintf(stderr, "tokenize failed (%d)\n", nt); return 1; }
    printf("{\"prompt_ids\": [");
    for (int i = 0; i < nt; i++) printf("%s%d", i ? ", " : "", toks[i]);
    printf("], \"greedy\": [");
    if (llama_decode(c, llama_batch_get_one(toks, nt))) { fprintf(stderr, "decode failed\n"); return 1; }
    int nv = llama_vocab_n_tokens(v);
    float *margins = malloc(sizeof(float) * (size_t)n);
    float *all = malloc(sizeof(float) * (size_t)n * (size_t)nv);
    for (int i = 0; i < n; i++) {
        float *l = llama_get_logits_ith(c, -1);
        int best = 0;
        for (int j = 1; j < nv; j++) if (l[j] > l[best]) best = j;
        if (l[best] != l[best]) { fprintf(stderr, "NaN logits\n"); return 1; }
        float second = -1e30f;
        for (int j = 0; j < nv; j++) if (j != best && l[j] > second) second = l[j];
        margins[i] = l[best] - second;
        memcpy(all + (size_t)i * nv, l, sizeof(float) * (size_t)nv);
        printf("%s%d", i ? ", " : "", best);
        fflush(stdout);
        llama_token t = best;
        if (i + 1 < n && llama_decode(c, llama_batch_get_one(&t, 1))) { fprintf(stderr, "decode failed\n"); return 1; }
    }
    printf("], \"top2_margins\": [");
    for (int i = 0; i < n; i++) printf("%s%.6g", i ? ", " : "", margins[i]);
    printf("], \"logits\": [");
    for (int i = 0; i < n; i++) {
        printf("%s[", i ? ",\n" : "\n");
        for (int j = 0; j < nv; j++) printf("%s%.9g", j ? ", " : "", all[(size_t)i * nv + j]);
        printf("]");
    }
    printf("], \"n_threads\": %d, \"kv_cache\": \"%s\", \"flash_attn\": \"%s\"}\n", th,
           exact ? "f32" : "f16", exact ? "disabled" : "auto");
    free(all);
    free(margins);
    llama_free(c);
    llama_model_free(m);
    return 0;
}
