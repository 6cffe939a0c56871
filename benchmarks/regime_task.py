"""A world where the student's best answer is not the teacher's: does Delta-KD's premise hold?

    python -m benchmarks.quality regime [--smoke] [--report-only]   # builds this world on first use, then reuses it

Delta-KD trains the student toward π* ∝ πS0·(πT/πB)^α: the teacher's SFT shift applied
to the student's own base. EFT (Mitchell et al., ICLR 2024) finds that a large model's
finetuning delta applied to a small base adds the finetuned behaviour while the small
base keeps its own knowledge. The demo world never tests this: both bases learn the
same corpus. This world splits the knowledge between them.

DESIGN (fixed before any objective was run on this world; not changed after results)

World. The demo's generator, tokenizer and sizes (scripts/demo/synthetic.py): its 40
invented creatures (`creatures(random.Random(0))`, the demo's knowledge base), split by
position into three disjoint sets,
  A = kb[0::3] (14 creatures): stated only in the teacher base's pretraining corpus,
  S = kb[1::3] (13): stated only in the student base's corpus,
  C = kb[2::3] (13): stated in both.
Teacher corpus: `synthetic.corpus(A ∪ C)`, student corpus: `synthetic.corpus(S ∪ C)`,
3000 documents each (3/4 fact documents, 1/4 word-list documents, separate seeded
streams). Tokenizer: the demo's shipped one (scripts/demo/assets/tokenizer), unchanged.
Checkpoints exactly as `synthetic.build_checkpoints`: teacher 128x4 (init seed 1) and
student 48x2 (init seed 2), 1500 pretraining steps each (lr 3e-3, batch 32); the teacher
then finetuned 600 steps (lr 1e-3) on the training instructions.

Instructions. 2000 training instructions drawn with `synthetic.instruction` over A ∪ C
(the teacher is finetuned only on creatures it knows). For every creature of A ∪ C two
of its three single-fact questions (color, home, food; chosen by a seeded draw) are held
out: never asked in training. Its "Describe the X." prompt and its remaining question
are asked, so every fact of A ∪ C appears in some training response (a description
states color, home, food, size and legs). S creatures never appear in training. The
cache is built on the training instructions (the paper distils on the teacher's SFT
data) with the default build (union of top-16s + 16 tail samples, floor −12, alphas
0.5 1 1.5); students train from it.

Test (no prompt of it is a training prompt), scored per set:
  A:     both held questions of each A creature (28 prompts),
  S:     the three single-fact questions of each S creature (39),
  C:     both held questions of each C creature (26),
  words: 60 unseen word-list prompts (reverse, sort, count), as in the demo.
Greedy decoding, 40 new tokens, ROUGE-L F x 100 (`deltakd eval`). Beside it: "fact",
the share of answers that contain the asked fact's value (words: exact answers).

Students. 600 steps, 2048 tokens per batch, lr 2e-3, 20 warmup steps (the demo table's
settings); seeds 0 1 2. Rows: SFT, KD (forward KL), P1 α 1, P1 α 1.5, and the paper's
recipe 0.5·SFT + 0.5·D with D = KD and D = P1 (α 1). Each student's held-out full-
vocabulary KL(πT ‖ πθ) and KL(π* ‖ πθ) (π* at α 1, floor −12), teacher-forced on the
reference answers of each test set, mean per answer token, float32.

PREDICTIONS (from EFT's down-scaling result; fixed with the design)
  S: P1 α 1 scores at least KD, and 0.5·SFT + 0.5·P1 at least 0.5·SFT + 0.5·KD: P1's
     target keeps the student base's own answers where the teacher has nothing to say.
  A: KD scores at least P1 α 1, and the KD recipe at least the P1 recipe: KD transfers
     facts the student base never saw.
  C and words: no difference between P1 and KD (alone and in the recipe) beyond the
     seed spread.
Decision rule, per set and pair (X, Y): d = mean over seeds of ROUGE-L(X) − ROUGE-L(Y)
(same seed, same batches); spread = sample std over seeds of X + that of Y. "X scores at
least Y" holds unless d < −spread; "no difference" holds if |d| ≤ spread; a win of X
over Y is d > spread. P1 α 1.5 and "fact" are reported, not predicted.
"""
