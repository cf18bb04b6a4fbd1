// Loads a GGUF with libllama, tokenizes a prompt, decodes it and N greedy tokens; prints
// the tokens and the decode rate.
#include "llama.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
int main(int argc, char **argv) {
    if (argc < 3) { fprintf(stderr, "usage: llcheck MODEL N [THREADS]\n"); return 2; }
    int n = atoi(argv[2]); int th = argc > 3 ? atoi(argv[3]) : 2;
    llama_backend_init();
    double t0 = now();
    struct llama_model_params mp = llama_model_default_params();
    struct llama_model *m = llama_model_load_from_file(argv[1], mp);
    if (!m) { fprintf(stderr, "load failed\n"); return 1; }
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 512; cp.n_batch = 512; cp.n_threads = th; cp.n_threads_batch = th;
    struct llama_context *c = llama_init_from_model(m, cp);
    if (!c) { fprintf(stderr, "context failed\n"); return 1; }
    double t1 = now();
    const struct llama_vocab *v = llama_model_get_vocab(m);
    const char *p = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";
    llama_token toks[256];
    int nt = llama_tokenize(v, p, strlen(p), toks, 256, false, true);
    printf("load_s %.2f n_vocab %d prompt_tokens %d\n", t1 - t0, llama_vocab_n_tokens(v), nt);
    if (llama_decode(c, llama_batch_get_one(toks, nt))) { fprintf(stderr, "decode failed\n"); return 1; }
    int nv = llama_vocab_n_tokens(v);
    double t2 = now();
    for (int i = 0; i < n; i++) {
        float *l = llama_get_logits_ith(c, -1);
        int best = 0; for (int j = 1; j < nv; j++) if (l[j] > l[best]) best = j;
        if (l[best] != l[best]) { fprintf(stderr, "NaN logits\n"); return 1; }
        printf("%d ", best);
        llama_token t = best;
        if (llama_decode(c, llama_batch_get_one(&t, 1))) { fprintf(stderr, "decode failed\n"); return 1; }
    }
    double t3 = now();
    printf("\ndecode_tok_s %.3f\n", n / (t3 - t2));
    llama_free(c); llama_model_free(m);
    return 0;
}
