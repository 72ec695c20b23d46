"""timm's names for the tensors of an efficientnet_pytorch EfficientNet-Lite0 checkpoint
(`_blocks.3._depthwise_conv.weight` -> `blocks.2.0.conv_dw.weight`), as ferrotune's
`families::efficientnet::timm_name` maps them. Shared by the parity check and the bench."""

import re

STAGES = [1, 2, 2, 3, 3, 4, 1]


def timm_name(k):
    m = re.match(r"_blocks\.(\d+)\.(\w+)\.(.*)", k)
    if m:
        b, part, leaf = int(m.group(1)), m.group(2), m.group(3)
        s = 0
        while b >= STAGES[s]:
            b -= STAGES[s]
            s += 1
        names = ({"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
                 if s == 0 else
                 {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
                  "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"})
        return f"blocks.{s}.{b}.{names[part]}.{leaf}"
    a, leaf = k.split(".", 1)
    return {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
            "_fc": "classifier"}[a] + "." + leaf
