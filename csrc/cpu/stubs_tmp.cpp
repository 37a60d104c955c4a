#include "common.h"
namespace attnkit { namespace cpu { namespace ATTNKIT_ISA_NS {
Status attention_fwd(const AttentionParams&) { return Status::not_implemented; }
Status attention_bwd(const AttentionBwdParams&) { return Status::not_implemented; }
}}}
