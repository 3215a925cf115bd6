"""Image and caption embeddings of every sample of a set of shards (float16 .npy parts + metadata parquet).

    python index/embed.py --model runs/tiny --data 'shards/{00000..00099}.tar' --output emb/
    accelerate launch --num_processes 8 index/embed.py --model runs/tiny --data 'shards/{00000..00999}.tar' \\
        --output emb/
    # smoke-sized: --data shards/00000.tar

Each rank embeds its own shards (bf16 on GPU); a killed run continues where it stopped when rerun. Next step:
`python index/build.py emb/`.
"""

from clipkit.eval.cli import run_main
from clipkit.index.cli import embed_main

if __name__ == "__main__":
    run_main(embed_main)
