"""ListOps tokens, shared by the generator (`listops`) and the reader of the LRA's files
(`listops_files`): digits, the four operators and the closing bracket."""

DIGIT0 = 2  # tokens 2..11: the digits
OPS = ('[MIN', '[MAX', '[MED', '[SM')
OP0 = DIGIT0 + 10  # tokens 12..15: the operators
END = OP0 + len(OPS)  # token 16: ']'
VOCAB = {**{str(d): DIGIT0 + d for d in range(10)}, **{op: OP0 + i for i, op in enumerate(OPS)},
         ']': END}
WORDS = {t: w for w, t in VOCAB.items()}
