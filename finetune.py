"""
Fine-tune a pretrained JOWA on one game (REFERENCE B§9 with the Part A fixes): batch 32, AdamW 5e-5, C51 TD + CQL
+ 0.5 x world loss, target copy every 1000 steps, the game's OWN task id and action mask in training and evaluation,
tokenizer frozen (--train_tokenizer trains it, as the official code does). After a warm-up every step also imagines:
a second batch is rolled H = 2 steps on by the beam-search planner (K = 2) from its last 8 - H real blocks, the new
segments enter a FIFO replay (10 x the dataset's segments), and the step trains on half real, half replayed imagined
segments. Evaluation every epoch without planning; the best snapshot is kept in best.pt (the paper reports it).

    python finetune.py --init=out/ckpt.pt --game=Pong --data=replay         # DQN-Replay dir: 5k steps of the last 20%
    python finetune.py --init=tokenizer.pt,JOWA_150M.pt --game=Pong --data=finetune   # processed dir (data.py process)
    python finetune.py --out_dir=out/finetune --resume                        # continue exactly; flags given win

Imagined segment (H = 2; plan.imagine, which train.py --imagine shares) from real steps O0..O7 (actions A, rewards
R) and the planner's best path a1 r1 o1, a2 r2 o2:
    slot     0   1   2   3   4   5   6   7
    frame    O2  O3  O4  O5  O6  O7  o1  o2      o1, o2 decoded by the tokenizer, in [0, 1] like the real frames
    action   A2  A3  A4  A5  A6  a1  a2  a2      the last a2 is a dummy (the official choice)
    reward   R2  R3  R4  R5  R6  r1  r2  0
ends 0, mask_padding True, real False. The TD pairs are then exactly the 7 transitions O2 -> ... -> O7 -> o1 -> o2:
slot 7 has no successor in the window and is not terminal, so it gets no TD term (it still enters CQL with the dummy
action, as officially). A segment is eligible if its last 8 - H steps are real and the last one is not terminal.
"""
import json
import os
import sys
import time
from dataclasses import asdict

import numpy as np
import torch

import data
from evaluate import evaluate
from model import (ARCH_FIELDS, REF_SCORES, action_mask, configure_optimizer, device_setup, load_checkpoint,
                   merge_resumed, normalized_score, parse_args, read_checkpoint, remove_temp_files, save_checkpoint,
                   task_id)
from data import Replay
from plan import Planner, imagine  # the imagination code train.py --imagine shares
from tokenizer import load_lpips_weights

DEFAULTS = dict(init='', game='Pong', data='', out_dir='out/finetune', resume=False,
                steps=50_000,           # gradient steps
                transitions=5000,       # steps drawn from a DQN-Replay dir (0 = all of the chosen files)
                ckpts='',               # DQN-Replay checkpoint files to draw from ('' = the last 20%: "expert" data)
                imagine=True, imagine_after=20_000, imagine_batch=32, imagine_horizon=2, imagine_beam=2,
                replay_factor=10,       # imagined-segment FIFO capacity, in dataset segments
                train_tokenizer=False, tok_frames=128,  # official code: Adam 1e-4 on 128 real frames per step
                eval_interval=0,        # steps between evaluations + checkpoints (0 = one epoch of the dataset)
                eval_episodes=16, eval_seconds=180.0, log_interval=200,
                report=True,            # at the end: evidence per stage and a random / greedy / planning score table
                heldout='')             # processed episodes of the game not trained on, for the report ('' = the data)
FINETUNE = dict(world_weight=0.5, batch_size=32, lr_world2=5e-5, lr_critic=5e-5, target_update=1000, context=8)


def prepare_data(src, game, out_dir, transitions, ckpts, seed=0):
    """The processed folder to train on: src itself if it holds <game>/meta.json (data.py process), else src is a
    DQN-Replay folder whose chosen checkpoint files are down-sampled into <out_dir>/data with stride-1 segments."""
    if os.path.exists(os.path.join(src, game, 'meta.json')):
        with open(os.path.join(src, game, 'meta.json')) as f:
            stride = json.load(f)['stride']
        if stride != 1:
            print(f"note: {src}/{game} has stride-{stride} segments; the official fine-tuning uses stride 1")
        return src
    root = os.path.join(src, game)
    runs = sorted(int(r) for r in os.listdir(root) if os.path.isdir(os.path.join(root, r, 'replay_logs'))) \
        if src and os.path.isdir(root) else []
    if not runs:
        raise FileNotFoundError(f"no data for {game} under {src!r}: expected <data>/{game}/meta.json (processed) or "
                                f"<data>/{game}/<run>/replay_logs (DQN-Replay)")
    logs = [os.listdir(os.path.join(root, str(r), 'replay_logs')) for r in runs]
    found = sorted(set.intersection(*[{int(f.split('.')[-2]) for f in files if f.startswith('$store$_terminal_')}
                                      for files in logs]))  # checkpoint numbers present in every run
    chosen = data.int_list(ckpts) if ckpts else found[len(found) - max(1, len(found) // 5):]
    out, key = os.path.join(out_dir, 'data'), (1, runs, chosen, transitions)
    if os.path.exists(os.path.join(out, game, 'meta.json')):  # reuse an identical earlier down-sampling (resume)
        with open(os.path.join(out, game, 'meta.json')) as f:
            m = json.load(f)
        if (m['stride'], m['source']['runs'], m['source']['ckpts'], m['source']['transitions']) == key:
            return out
    data.process_game(src, out, game, runs, chosen, fraction=1.0, transitions=transitions, stride=1, seed=seed)
    return out


def finetune(argv):
    # -------------------------------------------------------------------------
    # config: the checkpoint's, then the fine-tuning defaults (new runs), then the command line
    cli, args = parse_args(argv, dict(DEFAULTS), dict(
        out_dir='dir', steps='>0', transitions='>=0', imagine_after='>=0', imagine_batch='>0', imagine_horizon='>0',
        imagine_beam='>0', replay_factor='>0', tok_frames='>0', eval_interval='>=0', eval_episodes='>=0',
        eval_seconds='>0', log_interval='>0'))
    if args['data']:
        data.check_apart(('out_dir', args['out_dir']), [('data', args['data'])])
    remove_temp_files(args['out_dir'])
    given = {a[2:].partition('=')[0].replace('-', '_') for a in argv}
    ckpt_path, state = os.path.join(args['out_dir'], 'ckpt.pt'), None
    if args['resume']:
        if not os.path.exists(ckpt_path):
            raise FileNotFoundError(f"nothing to resume: {ckpt_path} does not exist")
        state = read_checkpoint(ckpt_path, 'finetune')  # the data and the replay depend on game, train_tokenizer
        cfg, args = merge_resumed(cli, args, given, state, (*ARCH_FIELDS, 'game', 'train_tokenizer'))
    elif not args['init']:
        raise ValueError("--init=<checkpoint> is required: our ckpt.pt, or the official 'tokenizer.pt,JOWA_150M.pt'")
    loaded, model, tokenizer = load_checkpoint(ckpt_path if state else args['init'])
    if not state:  # the initial weights' config with the fine-tuning recipe, then this command line's fields
        cfg = merge_resumed(cli, {}, given, dict(config={**asdict(loaded), **FINETUNE}, args={}))[0]
    for k, v in asdict(cfg).items():  # into the model's own config object: its losses read model.cfg
        setattr(loaded, k, v)
    cfg = loaded
    game, T = args['game'], cfg.max_blocks
    task_id(game), action_mask(game)  # an unknown game fails here, before any work
    if args['imagine'] and not 0 < args['imagine_horizon'] < T:
        raise ValueError(f"--imagine_horizon must be in 1..{T - 1}")
    device, dtype, autocast = device_setup(cfg)
    torch.manual_seed(cfg.seed)

    # -------------------------------------------------------------------------
    # data: two independent streams of real segments (training, imagination) and the imagined-segment FIFO. With the
    # tokenizer frozen every frame is encoded once (data.py's token cache) and training runs on tokens.
    src = prepare_data(args['data'], game, args['out_dir'], args['transitions'], args['ckpts'], cfg.seed)
    tokens = not args['train_tokenizer']
    if tokens:
        with autocast:
            data.build_token_cache(src, [game], tokenizer.to(device))  # kept if this tokenizer made it
    ds = data.load_dataset(src, [game], tokens=tokens)
    sampler, isampler = data.Sampler(ds, T, cfg.seed), data.Sampler(ds, T, cfg.seed + 1)
    replay = Replay(args['replay_factor'] * ds[0]['segments'], cfg.seed)
    eval_interval = args['eval_interval'] or -(-ds[0]['segments'] // cfg.batch_size)
    to = lambda b: {k: v.to(device) for k, v in b.items()}

    # -------------------------------------------------------------------------
    # model, optimizers, resumed state
    model.to(device).train()
    tokenizer.to(device).eval()  # eval mode even when trained: LPIPS in eval mode (Part A)
    tokenizer.requires_grad_(False)
    opt = configure_optimizer(model, cfg.lr_world2, cfg.lr_critic, cfg.weight_decay)
    tok_opt = None
    if args['train_tokenizer']:
        load_lpips_weights(tokenizer)  # a no-op when the checkpoint holds them
        tok_opt = torch.optim.Adam([p.requires_grad_() for p in tokenizer.trainable_parameters()], lr=cfg.lr_tokenizer)
    planner = Planner(model, compile=cfg.compile, jacobi=True)  # not timings: a resumed run imagines the same
    step, best = 0, dict(score=float('-inf'), step=0)
    if state:
        opt.load_state_dict(state['optimizer'])
        for g, lr in zip(opt.param_groups, (cfg.lr_world2, cfg.lr_world2, cfg.lr_critic)):
            g['lr'] = lr  # the config's learning rates win over the saved ones
        if tok_opt and state['tok_optimizer']:
            tok_opt.load_state_dict(state['tok_optimizer'])
        step, best = state['step'], state['best']
        sampler.load_state_dict(state['sampler']), isampler.load_state_dict(state['isampler'])
        replay.load_state_dict(state['replay'])
        torch.set_rng_state(state['rng']['cpu'])
        if state['rng']['cuda'] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state['rng']['cuda'])
    else:
        model.update_target()  # B§9: the target head starts as a copy of the online head
    print(f"fine-tuning {game} (task {task_id(game)}) from step {step}: {ds[0]['segments']} segments in {src}, batch "
          f"{cfg.batch_size}, imagination {'from step %d' % args['imagine_after'] if args['imagine'] else 'off'}, "
          f"tokenizer {'trained' if tok_opt else 'frozen (token cache)'}, {device} {dtype}")

    def snapshot(**more):  # a regular checkpoint (load_checkpoint reads it) plus `more`
        return dict(config=asdict(cfg), model=model.state_dict(), tokenizer=tokenizer.state_dict(), game=game,
                    step=step, **more)

    # -------------------------------------------------------------------------
    # training loop
    history, t0, t_step = [], time.time(), step
    while step < args['steps']:
        imagining = args['imagine'] and step >= args['imagine_after']
        n_real = cfg.batch_size // 2 if imagining else cfg.batch_size
        batch = dict(to(sampler.sample(n_real, tokens)), real=torch.ones(n_real, dtype=torch.bool, device=device))
        n_new = 0
        if imagining:
            model.eval()  # the planner runs without dropout
            with autocast:
                new = imagine(planner, tokenizer, to(isampler.sample(args['imagine_batch'], tokens)),
                              args['imagine_horizon'], args['imagine_beam'])
            model.train()
            if new is not None:
                replay.push(new)
                n_new = len(new['envs'])
            if replay.size:
                imag = to(replay.sample(cfg.batch_size - n_real))
                batch = {k: torch.cat([v, imag[k]]) for k, v in batch.items()}
        with autocast:
            loss, terms = model.compute_loss(batch, tokenizer, stage=2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        if tok_opt:  # on real frames of the real half only, never padding
            frames = batch['observations'][:n_real][batch['mask_padding'][:n_real]]
            with autocast:
                frames = frames[torch.randperm(len(frames), device=device)[:args['tok_frames']]]
                tok_loss, _ = tokenizer.compute_loss(frames)
            tok_opt.zero_grad(set_to_none=True)
            tok_loss.backward()
            torch.nn.utils.clip_grad_norm_(tokenizer.trainable_parameters(), cfg.grad_clip)
            tok_opt.step()
            terms['tokenizer'] = tok_loss.detach()
        step += 1
        if step % cfg.target_update == 0:
            model.update_target()

        if step % args['log_interval'] == 0 or step == args['steps']:
            terms = dict(loss=loss.item(), **{k: v.item() for k, v in terms.items()})  # .item(): a CPU-GPU sync
            history.append(dict(step=step, **terms))
            dt, t0, t_step = (time.time() - t0) / (step - t_step), time.time(), step  # per step, evaluation excluded
            print(f"step {step} | " + ' '.join(f'{k} {v:.4f}' for k, v in terms.items()) +
                  f" | imagined {n_new} replay {replay.size} | {dt * 1000:.0f} ms", flush=True)
        if step % eval_interval == 0 or step == args['steps']:
            if args['eval_episodes']:
                t_eval = time.time()
                model.eval()
                returns = evaluate(model, tokenizer, cfg, [game], args['eval_episodes'], plan=False,
                                   max_seconds=args['eval_seconds'])[0][game]
                model.train()
                score = float(np.mean(returns))
                if score > best['score']:
                    best = dict(score=score, step=step)
                    save_checkpoint(snapshot(score=score), os.path.join(args['out_dir'], 'best.pt'))
                print(f"eval step {step}: {game} mean return {score:.1f} over {len(returns)} episodes in "
                      f"{time.time() - t_eval:.0f}s (best {best['score']:.1f} at step {best['step']})", flush=True)
            rng = dict(cpu=torch.get_rng_state(),
                       cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
            save_checkpoint(snapshot(script='finetune', args=args, best=best, optimizer=opt.state_dict(), rng=rng,
                                     tok_optimizer=tok_opt and tok_opt.state_dict(), sampler=sampler.state_dict(),
                                     isampler=isampler.state_dict(), replay=replay.state_dict()), ckpt_path)
            t0 = time.time()
    if best['step']:
        dns = f", DNS {normalized_score(game, best['score'], 'dqn'):.3f}" if game in REF_SCORES else ''
        print(f"best {game} score {best['score']:.1f} at step {best['step']}{dns} -> {args['out_dir']}/best.pt")
    if args['report']:
        from evaluate import report
        if not args['heldout']:
            print(f"note: no --heldout, so the report's frames come from the fine-tuning data {src}")
        report(model.eval(), tokenizer.eval(), cfg, [game], args['out_dir'], args['heldout'] or src, history,
               args['eval_episodes'], cfg.max_steps, args['eval_seconds'])
    return dict(model=model, tokenizer=tokenizer, history=history, best=best, step=step, replay=replay)


if __name__ == '__main__':
    try:
        finetune(sys.argv[1:])
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
