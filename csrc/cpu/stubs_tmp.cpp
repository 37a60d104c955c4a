#include "common.h"
namespace attnkit { namespace cpu { namespace ATTNKIT_ISA_NS {
Status attention_bwd(const AttentionBwdParams&) { return Status::not_implemented; }
}}}
