"""``vlmr eval ...``: the paper's four kinds of evaluation, and exact scoring on the synthetic world.

Every command streams a shard set made by ``vlmr build-shards``, has each model answer
each sample's question about its video (greedy, batched, with a KV cache), scores the
answers, and writes per-sample results and one table that puts the models side by side::

    vlmr eval synthetic  --shards S --world runs/demo/world --models runs/sft runs/ppo
    vlmr eval qa         --shards S --models M1 M2 --judge http://127.0.0.1:8000/v1 --judge-model NAME
    vlmr eval generative --shards S --models M1 M2 --judge /models/llama-3-8b-instruct
    vlmr eval retrieval  --shards S --models M1 M2 [--clip /models/clip-vit-l14]
    vlmr eval action     --shards S --models M1 M2 --classes classInd.txt [--clip PATH]
    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 .venv/bin/vlmr eval synthetic ...   # many ranks
    torchrun --nproc_per_node 8 -m train.eval.run qa ...                             # the same

``--models`` takes saved models (a folder with ``vlmr_model.json``, or a training run's
output folder holding ``model/``): the SFT model, the PPO policy, any other — each is
loaded with ``VideoLMM.load`` and asked the same way. ``--predictions FILE`` scores answers
made elsewhere instead (JSONL lines ``{"key", "prediction"[, "prediction2"]}``, ``key`` being
the sample key or the record ``id``). Columns are named by the shortest distinct tails of
the model folders (``runs/sft/model`` and ``runs/ppo/model``: ``sft``, ``ppo``) and by the
predictions files' stems, unless ``--names`` says otherwise.

What each command measures
--------------------------
``synthetic`` — no judge: the synthetic world's truth is known (``dataengine/synth.py``,
``--world`` is the folder with its ``captions.json``). Accuracy per question type
(``qtype``: colour, shape, direction, count, object, event, order, describe; scored by
``train.metrics.answer_correct``: the words of the asked kind, or the sequence of event
phrases, must equal the reference's), event F1 (partial credit on event/order/describe
answers) and the groundedness rate: of the colours, shapes and directions the answers name,
the share really in the video. This runs on CPU in seconds and shows whether a training
step moved the tiny model the right way.

``qa`` — zero-shot open-ended QA (MSVD-QA, MSRVTT-QA, ActivityNet-QA; paper Table 2): an LLM
judge (``--judge``: ``tiny``, a local model folder, or an OpenAI-compatible URL with
``--judge-model``) compares each answer with the reference using
``train/prompts/eval_qa.txt`` and replies yes/no and a 0–5 score. Reports accuracy (share
of yes) and mean score.

``generative`` — the video-based generative benchmark (paper Table 1): five criteria, each
0–5 from the judge with its own prompt (``train/prompts/eval_generative_*.txt``):
correctness, detail and context on the generic questions, temporal on the temporal ones,
consistency on pairs of differently worded questions about one video.

``retrieval`` — zero-shot text-to-video retrieval (paper Table 3), as the paper describes
it after Li et al.: the CLIP score between the model's generated description of each video
and each ground-truth caption. Captions and descriptions are embedded with the CLIP *text*
tower (``--clip``, tiny by default); for each caption the videos are ranked by the cosine
similarity of their descriptions to it; R@1, R@5, R@10. Ties count against the right video.

``action`` — zero-shot action recognition (UCF101, HMDB51; paper Table 3): the CLIP text
similarity between the model's description of the video and each class prompt
(``--class-template``, default ``a video of a person {class}.``, with ``ApplyEyeMakeup`` or
``brush_hair`` written as ``apply eye makeup``, ``brush hair``); top-1 and top-5.

Annotation forms (build shards from them with ``vlmr build-shards``)
-------------------------------------------------------------------
Any format ``dataengine.ingest`` reads works; the first human turn is the question and the
first answer the reference. Extra keys of a Video-ChatGPT record travel into the sample's
json, which is how the fields below reach the evaluation::

    qa          [{"video_id": "vid1", "q": "what is the man doing?", "a": "cooking"}, ...]
                (or LLaVA JSON/JSONL, or a NExT-QA CSV)
    generative  [{"video_id": "vid1", "q": "...", "a": "...", "task": "generic"},
                 {"video_id": "vid1", "q": "...", "a": "...", "task": "temporal"},
                 {"video_id": "vid2", "q": "...", "q2": "<the same question reworded>", "a": "...",
                  "task": "consistency"},
                 {"video_id": "vid3", "q": "...", "a": "...", "question_pair": "p7"},
                 {"video_id": "vid3", "q": "<reworded>", "a": "...", "question_pair": "p7"}]
                ``task`` defaults to generic (consistency when ``question_pair`` is given);
                a consistency sample holds both wordings (``q2``) or is one of exactly two
                records sharing a ``question_pair`` id (the first in stream order is question 1)
    retrieval   [{"video_id": "vid1", "q": "Describe this video in detail.", "a": "<caption>"}, ...]
                one record per caption; several captions of one video are several queries
    action      [{"video_id": "v_ApplyEyeMakeup_g01_c01", "q": "What is the person doing?",
                  "a": "apply eye makeup", "label": "ApplyEyeMakeup"}, ...]
                ``label`` is a class name of ``--classes`` (or a 0-based index into it); without
                it the answer is taken as the label. ``--classes`` lists one class per line, or
                UCF101's ``classInd.txt`` form ``1 ApplyEyeMakeup``
    synthetic   the synthetic world's own annotations.json (``qtype`` in every record)

Retrieval and action ask every video ``--prompt`` (default "Describe this video in
detail."; an empty prompt asks each sample's own question) and generate each (video,
prompt) once per rank.

Ranks, outputs, failures
------------------------
Under torchrun (ranks and their gloo process group as in ``train.shardpass``) each rank
streams its share of the samples (``dataengine.reader.ShardReader``, no shuffle, with
``remainder="repeat"``: the few samples two ranks get are kept once, by stream index) and
generates; answers are gathered to rank 0 (as JSON, never pickled). Judge
requests are dealt to all ranks and their replies gathered; CLIP scoring runs on rank 0.
Outputs, written by rank 0 to temporary names and renamed::

    OUTPUT/config.json                the command's settings
    OUTPUT/summary.txt                the side-by-side table (also printed)
    OUTPUT/summary.json               every model's metrics and counts, and the table
    OUTPUT/NAME/results.jsonl         one line per sample: question, reference, prediction,
                                      and the verdict/score/rank of that sample
    OUTPUT/NAME/summary.json          that model's part of summary.json

Nothing is lost silently: samples the reader could not read, malformed samples (with
``--on-error skip``), prompts too long for the model, judge replies without a readable
verdict and judge requests that failed after their retries are counted, listed in the
results and shown in the table. Judge replies are cached (``--judge-cache``, default
``$VLMR_CACHE/llm``; temperature 0, a fixed seed), so a re-run sends no request twice.

The package, in the order a run uses it:

    configs.py     the typed settings of each command, the constants (output names, question kinds)
    answering.py   what is evaluated (models, predictions files), samples → items, answers
                   generated or read on every rank and gathered to rank 0
    judging.py     the LLM judge (requests dealt to all ranks, cached) and CLIP text scoring
    tasks.py       one Task per command: what it asks of a sample and how it scores
    run.py         the run: candidates → answers → scores → results and the side-by-side table;
                   the ``vlmr eval`` entry points

Tests: ``pytest tests/test_metrics.py tests/test_evaluate.py``.
"""
