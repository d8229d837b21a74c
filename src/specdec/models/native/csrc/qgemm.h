// What specdec_qgemm_many takes per weight (qgemm.cpp computes it, decoder.cpp calls it): the
// arguments of one specdec_qgemm call.
#pragma once

#include <cstdint>

struct QJob {
  int64_t fmt;
  const uint8_t* xq;
  int64_t K;
  const uint8_t* w;
  int64_t N;
  const float* bias;
  float* y;
  int64_t ldy;
};
