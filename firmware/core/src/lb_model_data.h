/* The model a board firmware carries, as firmware/tools/embed_model.py writes it into
 * model_data.cpp: 16-byte aligned (TFLM reads weights in place) and const (so it stays in
 * flash). */
#ifndef LB_MODEL_DATA_H
#define LB_MODEL_DATA_H

#ifdef __cplusplus
extern "C" {
#endif

extern const unsigned char lb_model_data[];
extern const unsigned int lb_model_data_bytes;
extern const char lb_model_name[]; /* reported by profile% as m-model-[...] */

#ifdef __cplusplus
}
#endif

#endif /* LB_MODEL_DATA_H */
