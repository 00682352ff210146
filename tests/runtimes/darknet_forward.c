/*
 * darknet_forward.c - one CPU forward pass through a real Darknet (libdarknet).
 *
 * Built at test time by tests/runtimes/darknet_runtime.py against Debian's `darknet`
 * package (pjreddie/darknet 61c9d02e, 2018-09-14, CPU build), whose batch norm
 * divides by sqrt(var) + 1e-6 (src/blas.c normalize_cpu).
 *
 * usage: darknet_forward CFG WEIGHTS INPUT.f32 OUTDIR LAYER [LAYER ...]
 *
 *   INPUT.f32  raw little-endian float32, CHW, exactly net->inputs values
 *              (no image decoding, no letterbox, no channel swap)
 *   LAYER      0-based Darknet layer index; its `output` (batch 1, l.outputs
 *              floats, CHW) is written to OUTDIR/layer_<LAYER>.f32
 *
 * stdout: one line "net <w> <h> <c> <n_layers>" then one line per dumped layer
 *         "layer <i> <type> <out_w> <out_h> <out_c> <outputs>".
 * Exit status 0 on success; 2 on usage/shape errors; 3 on I/O errors.
 */
#include <stdio.h>
#include <stdlib.h>
#include "darknet.h"

static int write_floats(const char *path, const float *data, size_t n)
{
    FILE *f = fopen(path, "wb");
    if (!f) { perror(path); return 0; }
    size_t w = fwrite(data, sizeof(float), n, f);
    if (fclose(f) != 0 || w != n) { perror(path); return 0; }
    return 1;
}

int main(int argc, char **argv)
{
    if (argc < 6) {
        fprintf(stderr, "usage: %s CFG WEIGHTS INPUT.f32 OUTDIR LAYER [LAYER ...]\n", argv[0]);
        return 2;
    }
    /* clear=0: keep `seen`; irrelevant for inference. */
    network *net = load_network(argv[1], argv[2], 0);
    set_batch_network(net, 1);
    printf("net %d %d %d %d\n", net->w, net->h, net->c, net->n);

    size_t n_in = (size_t)net->inputs;
    float *input = malloc(n_in * sizeof(float));
    FILE *f = fopen(argv[3], "rb");
    if (!f) { perror(argv[3]); return 3; }
    size_t got = fread(input, sizeof(float), n_in, f);
    int extra = fgetc(f);
    fclose(f);
    if (got != n_in || extra != EOF) {
        fprintf(stderr, "input %s: expected exactly %zu float32 values\n", argv[3], n_in);
        return 2;
    }

    network_predict(net, input);   /* net->train = 0: rolling statistics */

    for (int a = 5; a < argc; ++a) {
        int i = atoi(argv[a]);
        if (i < 0 || i >= net->n) {
            fprintf(stderr, "layer %d out of range (0..%d)\n", i, net->n - 1);
            return 2;
        }
        layer l = net->layers[i];
        char path[4096];
        snprintf(path, sizeof path, "%s/layer_%d.f32", argv[4], i);
        if (!write_floats(path, l.output, (size_t)l.outputs)) return 3;
        printf("layer %d %d %d %d %d %d\n", i, (int)l.type, l.out_w, l.out_h, l.out_c, l.outputs);
    }
    free(input);
    free_network(net);
    return 0;
}
