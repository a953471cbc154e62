/* Decode only a region of a JPEG, optionally DCT-scaled by 1/2, 1/4 or 1/8.
 *
 * Built by setup.py as the extension ffcv_bias._fastjpeg and called through ctypes from
 * the numba decoder (ffcv_bias/data/fast_decode.py), the way ffcv calls its libffcv. It uses
 * the libjpeg API of libjpeg-turbo 2.x ("Partial image decompression" in libjpeg.txt):
 *   - jpeg_crop_scanline: columns outside the region (rounded out to the iMCU grid) are
 *     neither IDCT'd, upsampled nor colour-converted;
 *   - jpeg_skip_scanlines: rows above the region are entropy-decoded only;
 *   - rows below the region are never read (jpeg_abort_decompress stops there);
 *   - scale_denom: the IDCT itself outputs 1/2, 1/4 or 1/8 of the pixels.
 * TurboJPEG 2.1 (what ffcv's libffcv uses) has no such region decode: its tjTransform
 * crop transcodes the whole image's coefficients first.
 *
 * The pixels match ffcv's tjDecompress2(TJPF_RGB, TJFLAG_FASTDCT): same IDCT (JDCT_IFAST),
 * fancy upsampling, RGB output. Anything this cannot decode exactly like the full decode
 * (CMYK/YCCK, a libjpeg error, any libjpeg warning such as corrupt data) returns a
 * non-zero reason and the caller decodes the image the exact way instead.
 */
#include <Python.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <jpeglib.h>

/* Return codes; 0 is success. Kept in step with fast_decode.FALLBACK_REASONS. */
enum {
    FASTJPEG_OK = 0,
    FASTJPEG_LIBJPEG_ERROR = 1,   /* libjpeg raised an error (corrupt or unsupported file) */
    FASTJPEG_COLOUR_SPACE = 2,    /* not greyscale, YCbCr or RGB (CMYK, YCCK, ...) */
    FASTJPEG_WARNING = 3,         /* libjpeg warned (e.g. corrupt data): not trusted */
    FASTJPEG_BAD_REGION = 4,      /* region outside the scaled image or buffer too small */
};

struct error_manager {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
};

/* One decompressor per thread (ffcv's loader decodes from a pool of threads), created on
 * first use and reused: creating one per image would cost more than a small crop's decode. */
struct thread_decoder {
    struct jpeg_decompress_struct cinfo;
    struct error_manager error;
    int ready;
};

static __thread struct thread_decoder decoder;

static void jump_on_error(j_common_ptr cinfo)
{
    longjmp(((struct error_manager *)cinfo->err)->jump, 1);
}

/* Count warnings (libjpeg's default does) but print nothing: the caller falls back. */
static void count_message(j_common_ptr cinfo, int level)
{
    if (level < 0)
        cinfo->err->num_warnings++;
}

static int ensure_decoder(void)
{
    if (decoder.ready)
        return 1;
    decoder.cinfo.err = jpeg_std_error(&decoder.error.pub);
    decoder.error.pub.error_exit = jump_on_error;
    decoder.error.pub.emit_message = count_message;
    if (setjmp(decoder.error.jump))
        return 0;   /* a libjpeg/header version mismatch lands here */
    jpeg_create_decompress(&decoder.cinfo);
    decoder.ready = 1;
    return 1;
}

static int colour_space_supported(J_COLOR_SPACE space)
{
    return space == JCS_GRAYSCALE || space == JCS_YCbCr || space == JCS_RGB;
}

/* Decode rows [top, top + height) and at least columns [left, left + width) of the image
 * scaled by 1/scale_denom into `destination` (RGB, rows packed at the decoded width).
 * layout receives [rows, decoded row width, column of `left` within a decoded row]: the
 * decoded columns start at the iMCU boundary at or left of `left`. */
int fastjpeg_decode_region(const uint8_t *source, uint64_t source_size,
                           uint32_t scale_denom, uint32_t top, uint32_t left,
                           uint32_t height, uint32_t width,
                           uint8_t *destination, uint64_t destination_size,
                           int32_t *layout)
{
    struct jpeg_decompress_struct *cinfo = &decoder.cinfo;
    JDIMENSION column_offset, decoded_width;
    JSAMPROW rows[8];
    uint32_t bottom = top + height;

    if (!ensure_decoder())
        return FASTJPEG_LIBJPEG_ERROR;
    if (setjmp(decoder.error.jump)) {
        jpeg_abort_decompress(cinfo);
        return FASTJPEG_LIBJPEG_ERROR;
    }
    decoder.error.pub.num_warnings = 0;
    jpeg_mem_src(cinfo, source, (unsigned long)source_size);
    jpeg_read_header(cinfo, TRUE);
    if (!colour_space_supported(cinfo->jpeg_color_space)) {
        jpeg_abort_decompress(cinfo);
        return FASTJPEG_COLOUR_SPACE;
    }
    cinfo->out_color_space = JCS_RGB;
    cinfo->dct_method = JDCT_IFAST;          /* = TJFLAG_FASTDCT, as ffcv decodes */
    cinfo->do_fancy_upsampling = TRUE;       /* = tjDecompress2 without TJFLAG_FASTUPSAMPLE */
    cinfo->scale_num = 1;
    cinfo->scale_denom = scale_denom;
    jpeg_start_decompress(cinfo);
    if (width == 0 || height == 0 || left + width > cinfo->output_width ||
        bottom > cinfo->output_height) {
        jpeg_abort_decompress(cinfo);
        return FASTJPEG_BAD_REGION;
    }
    /* One more column on each side than asked for: jpeg_crop_scanline makes the upsampler
     * treat the decoded columns as the whole row, so with horizontally subsampled chroma the
     * outermost decoded column is upsampled from a replicated edge, not its neighbour. With
     * the margin, every column asked for is upsampled exactly as in the full decode. */
    column_offset = left > 0 ? left - 1 : 0;
    decoded_width = (left + width < cinfo->output_width ? left + width + 1 : left + width)
                    - column_offset;
    if (decoded_width < cinfo->output_width)
        jpeg_crop_scanline(cinfo, &column_offset, &decoded_width);
    else
        column_offset = 0;
    if ((uint64_t)height * decoded_width * 3 > destination_size) {
        jpeg_abort_decompress(cinfo);
        return FASTJPEG_BAD_REGION;
    }
    if (top > 0 && jpeg_skip_scanlines(cinfo, top) != top) {
        jpeg_abort_decompress(cinfo);
        return FASTJPEG_BAD_REGION;
    }
    while (cinfo->output_scanline < bottom) {
        uint32_t done = cinfo->output_scanline - top;
        uint32_t batch = bottom - cinfo->output_scanline;
        uint32_t i;
        if (batch > 8)
            batch = 8;
        for (i = 0; i < batch; i++)
            rows[i] = destination + (uint64_t)(done + i) * decoded_width * 3;
        jpeg_read_scanlines(cinfo, rows, batch);
    }
    if (decoder.error.pub.num_warnings > 0) {
        jpeg_abort_decompress(cinfo);
        return FASTJPEG_WARNING;
    }
    jpeg_abort_decompress(cinfo);   /* rows below the region are never decoded */
    layout[0] = (int32_t)height;
    layout[1] = (int32_t)decoded_width;
    layout[2] = (int32_t)(left - column_offset);
    return FASTJPEG_OK;
}

/* The version of the libjpeg API this was compiled against, to compare at load time. */
int fastjpeg_lib_version(void)
{
    return JPEG_LIB_VERSION;
}

/* A module so that setuptools builds and installs this like any extension; Python code
 * only uses it to find the shared object's path, then loads it with ctypes. */
static struct PyModuleDef fastjpeg_module = {
    PyModuleDef_HEAD_INIT, "_fastjpeg",
    "Region + DCT-scaled JPEG decoding for ffcv_bias (called through ctypes).", -1, NULL,
};

PyMODINIT_FUNC PyInit__fastjpeg(void)
{
    return PyModule_Create(&fastjpeg_module);
}
